//! Anonymized branches: masked values, no original value left anywhere in
//! the branch's files, constraints intact, deterministic fakes, and the
//! root refused as a direct parent when configured so.

mod common;

use std::path::Path;

use common::{Fs, TestEnv};

const CONFIG: &str = r#"project = "shop"
[anonymize]
refuse_root_children = true
[anonymize.columns]
"public.users.email" = "email"
"public.users.full_name" = "name"
"public.users.phone" = "phone"
"public.users.ssn" = "hash"
"public.users.notes" = "null"
"public.users.country" = { constant = "XX" }
"public.users.card" = { keep_first = 4 }
"public.orders.ship_to" = { sql = "'redacted ' || id" }
"#;

/// Files under `dir` that contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(p.display().to_string());
                }
            }
        }
    }
    hits
}

#[test]
fn anonymized_branch_keeps_no_original_value_anywhere() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    std::fs::write(env.repo.join(".pgtwig.toml"), CONFIG).unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create extension amcheck; \
         create table users(id int primary key, email text unique not null, full_name text, phone text unique, \
           ssn text, card text, notes text, country text, birth_date date); \
         insert into users select g, 'pii-mail-' || g || '@corp.example', 'Zyxname' || g, '+44-7700-' || lpad(g::text, 6, '0'), \
           'SSN-' || g, '4111222233' || lpad(g::text, 6, '0'), 'secret note ' || g, 'NL', null from generate_series(1, 500) g; \
         create table orders(id int primary key, user_id int references users(id), ship_to text); \
         insert into orders select g, g, 'Hidden Street ' || g from generate_series(1, 500) g; \
         update users set notes = notes || ' (edited)' where id <= 100; \
         analyze users; analyze orders; checkpoint",
    );
    // The original values are in main's files (heap, indexes, statistics).
    assert!(
        !files_containing(&env.project_dir().join("branches/main/data"), b"pii-mail-").is_empty()
    );

    // Another database of the branch with a PII-looking column: the rules are about the app's
    // database only, so anonymize says it copies that one as it is.
    env.psql("main", "create database crm");
    let crm = env
        .ok(&["branch", "url", "main", "--database", "crm"])
        .trim()
        .to_string();
    common::psql(&crm, "create table contacts(email text)");
    // The config came with the repository: its SQL mask runs as the superuser only once
    // approved, and nothing is made before.
    let err = env.fails(&["anonymize", "--into", "anon"]);
    assert!(
        err.contains("has SQL masks, which pgtwig runs as the branch's superuser")
            && err.contains("public.orders.ship_to = 'redacted ' || id")
            && err.contains("`pgtwig trust`"),
        "{err}"
    );
    assert!(!env.project_dir().join("branches/anon").exists());
    let approved = env.ok(&["trust"]);
    assert!(approved.contains("anonymize sql"), "{approved}");
    let run = env.run(&["anonymize", "--into", "anon"]);
    let out = String::from_utf8_lossy(&run.stdout);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{out}{err}");
    assert!(out.contains("Created anonymized branch \"anon\""), "{out}");
    assert!(
        out.contains("Masking database \"postgres\"")
            && err.contains("database \"crm\" of \"main\" has columns that look like personal data (public.contacts.email)"),
        "{out}{err}"
    );
    let anon_dir = env.project_dir().join("branches/anon");
    for needle in [
        "pii-mail-",
        "Zyxname",
        "+44-7700-",
        "SSN-",
        "secret note",
        "Hidden Street",
        "4111222233",
    ] {
        let hits = files_containing(&anon_dir, needle.as_bytes());
        assert!(hits.is_empty(), "{needle:?} survives in {hits:?}");
    }

    env.ok(&["branch", "start", "anon"]);
    let row = env.psql(
        "anon",
        "select email, full_name, phone, notes is null, country, card from users where id = 7",
    );
    let f: Vec<&str> = row.split('|').collect();
    assert!(
        f[0].starts_with("user_") && f[0].ends_with("@example.com"),
        "{row}"
    );
    // `name` on full_name: a full name. No country set: a national-looking number.
    assert!(f[1].contains(' '), "{row}");
    assert_eq!(
        env.psql(
            "anon",
            "select count(*) from users where phone !~ '^0[2-9][0-9]{2} [2-9][0-9]{6}$'"
        ),
        "0"
    );
    assert_eq!((f[3], f[4], f[5]), ("t", "XX", "4111************"), "{row}");
    assert_eq!(
        env.psql("anon", "select ship_to from orders where id = 3"),
        "redacted 3"
    );
    // Unique columns stay unique, constraints and indexes hold.
    assert_eq!(
        env.psql(
            "anon",
            "select count(distinct email) = 500 and count(distinct phone) = 500 from users"
        ),
        "t"
    );
    assert_eq!(
        env.psql("anon", "select count(*) from (select bt_index_check(i.indexrelid, true) from pg_index i join pg_class c on c.oid = i.indrelid where c.relname in ('users', 'orders')) s"),
        "4"
    );
    assert_eq!(
        env.psql(
            "anon",
            "select count(*) from orders o join users u on u.id = o.user_id"
        ),
        "500"
    );

    // Deterministic: the same input gives the same fake.
    env.ok(&["anonymize", "--into", "anon2"]);
    env.ok(&["branch", "start", "anon2"]);
    assert_eq!(
        env.psql("anon2", "select email from users where id = 7"),
        f[0]
    );

    // The root holds PII: branches must come from the anonymized one.
    let err = env.fails(&["branch", "create", "dev"]);
    assert!(
        err.contains("holds personal data") && err.contains("--from anon"),
        "{err}"
    );
    env.ok(&["branch", "create", "dev", "--from", "anon"]);

    // --check lists PII-looking columns without a rule.
    let out = env.run(&["anonymize", "--check"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("public.users.birth_date") && !text.contains("users.email"),
        "{text}"
    );
    // ... and reports each other database on its own.
    assert!(
        text.contains("database \"crm\" on \"main\": columns that look like personal data")
            && text.contains("\"public.contacts.email\""),
        "{text}"
    );
}

#[test]
fn a_rule_naming_a_missing_column_leaves_nothing_behind() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        "project = \"shop\"\n[anonymize.columns]\n\"public.users.emial\" = \"email\"\n",
    )
    .unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql("main", "create table users(id int primary key, email text)");
    let err = env.fails(&["anonymize", "--into", "anon"]);
    assert!(
        err.contains("public.users.emial names no existing column"),
        "{err}"
    );
    let names: Vec<String> = env
        .list_json()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["main"]);
    assert!(env.tmp_entries().is_empty(), "{:?}", env.tmp_entries());
    // A bad rule in the config is an error naming it.
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        "project = \"shop\"\n[anonymize.columns]\n\"public.users.email\" = \"scramble\"\n",
    )
    .unwrap();
    let err = env.fails(&["anonymize", "--into", "anon"]);
    assert!(
        err.contains("unknown masking rule \"scramble\"") && err.contains("line 3"),
        "{err}"
    );
}

/// Column-aware fakes: each name part in its column, phones in their country's E.164 shape,
/// user names; deterministic (equal inputs, equal fakes) and never the original.
#[test]
fn fakes_follow_the_column_kind() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        r#"project = "shop"
[anonymize]
country = "DE"
[anonymize.columns]
"public.people.first_name" = "name"
"public.people.surname" = "name"
"public.people.full_name" = "name"
"public.people.given" = "first_name"
"public.people.family" = "last_name"
"public.people.mobile" = "phone"
"public.people.uk_mobile" = { phone = "GB" }
"public.people.us_phone" = { phone = "US" }
"public.people.username" = "username"
"#,
    )
    .unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create table people(id int primary key, first_name text, surname text, full_name text, given text, \
           family text, mobile text, uk_mobile text, us_phone text, username text); \
         insert into people select g, 'Orig' || g % 50, 'Origsur' || g % 50, 'Orig Full ' || g, 'Og' || g, 'Of' || g, \
           '+49 171 ' || g, '07700 ' || g, '555-' || g, 'login' || g % 50 from generate_series(1, 200) g",
    );
    let out = env.run(&["anonymize", "--into", "anon"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("masked public.people (1/1"),
        "progress per table: {out:?}"
    );
    env.ok(&["branch", "start", "anon"]);
    let bad = |condition: &str| {
        // NULL counts as bad: a fake must be there.
        env.psql(
            "anon",
            &format!("select count(*) from people where not coalesce({condition}, false)"),
        )
    };
    // One word for a part, two for a full name; never the original.
    for (column, words) in [
        ("first_name", 1),
        ("surname", 1),
        ("given", 1),
        ("family", 1),
        ("full_name", 2),
    ] {
        assert_eq!(
            bad(&format!(
                "array_length(regexp_split_to_array({column}, ' '), 1) = {words} and {column} !~ '^O(rig|g|f)'"
            )),
            "0",
            "{column}"
        );
    }
    // E.164 for the country (DE mobile, GB mobile, NANP), digits only after the plus.
    assert_eq!(bad("mobile ~ '^\\+4917[0-9]{9}$'"), "0");
    assert_eq!(bad("uk_mobile ~ '^\\+447[2-9][0-9]{8}$'"), "0");
    assert_eq!(bad("us_phone ~ '^\\+1[2-9][0-9]{2}[2-9][0-9]{6}$'"), "0");
    assert_eq!(bad("username ~ '^user_[0-9a-f]{12}$'"), "0");
    // Deterministic: equal originals (id 1 and 51 share them), equal fakes; different, mostly different.
    assert_eq!(
        env.psql(
            "anon",
            "select a.first_name = b.first_name and a.surname = b.surname and a.username = b.username \
             from people a, people b where a.id = 1 and b.id = 51"
        ),
        "t"
    );
    assert_eq!(
        env.psql(
            "anon",
            "select count(distinct username) = 50 and count(distinct mobile) = 200 from people"
        ),
        "t"
    );
}

/// `--check` knows names, user names, addresses, postcodes, IPs, birth dates, IBANs and card
/// numbers, in full and abbreviated, and suggests a rule for each.
#[test]
fn check_recognises_the_common_kinds_of_personal_data() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    let columns = [
        "username",
        "first_name",
        "lname",
        "name",
        "address_line1",
        "addr2",
        "postcode",
        "zip",
        "ip_address",
        "dob",
        "iban",
        "card_number",
    ];
    env.psql(
        "main",
        &format!(
            "create table customers(id int, created_at timestamptz, product_name text, first_seen date, {})",
            columns.map(|c| format!("{c} text")).join(", ")
        ),
    );
    let out = env.run(&["anonymize", "--check"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for c in columns {
        assert!(
            text.contains(&format!("\"public.customers.{c}\" = ")),
            "{c} missing:\n{text}"
        );
    }
    for c in ["id", "created_at", "product_name", "first_seen"] {
        assert!(
            !text.contains(&format!("customers.{c}\"")),
            "{c} flagged:\n{text}"
        );
    }
    assert!(
        text.contains("\"public.customers.first_name\" = \"first_name\""),
        "{text}"
    );
    assert!(
        text.contains("\"public.customers.card_number\" = { keep_first = 4 }"),
        "{text}"
    );
}
