//! `pgtwig diff --data A B`: row differences between real branches on a
//! copy-on-write file system, extent-aware, each checked against `--full`.

mod common;

use std::collections::BTreeMap;

use common::{Fs, TestEnv};
use serde_json::Value;

fn reflink_env() -> Option<TestEnv> {
    let env = TestEnv::new(Fs::Reflink);
    if env.is_none() && std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI needs PGTWIG_TEST_REFLINK_DIR for the extent-aware data diff");
    }
    env
}

/// `diff --data A B --json [extra]`: its JSON and exit code.
fn data_diff(env: &TestEnv, a: &str, b: &str, extra: &[&str]) -> (Value, i32) {
    let mut args = vec!["diff", "--data", a, b, "--json"];
    args.extend_from_slice(extra);
    let out = env.run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code().unwrap();
    assert!(code < 2, "pgtwig {args:?} failed: {stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), code)
}

/// table → (added, removed, changed).
fn counts(diff: &Value) -> BTreeMap<String, (u64, u64, u64)> {
    diff["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let n = |k: &str| t[k].as_u64().unwrap();
            (
                t["table"].as_str().unwrap().to_string(),
                (n("added"), n("removed"), n("changed")),
            )
        })
        .collect()
}

fn table<'v>(diff: &'v Value, name: &str) -> &'v Value {
    diff["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == name)
        .unwrap_or_else(|| panic!("no {name} in {diff:#}"))
}

const SETUP: &str = "
create table items(id int primary key, name text not null, qty int not null);
insert into items select i, 'item ' || i, i % 7 from generate_series(1, 20000) i;
create table hot(id int primary key, v int, note text) with (fillfactor = 50);
insert into hot select i, 0, 'n' || i from generate_series(1, 5000) i;
create table tagged(tag text, n int, payload text, primary key (tag, n));
insert into tagged select 'tag-' || (i % 50), i, md5(i::text) from generate_series(1, 5000) i;
create table nokey(x int, y text);
insert into nokey select i % 100, 'y' || (i % 100) from generate_series(1, 3000) i;
create table docs(id int primary key, body text);
insert into docs select i, (select string_agg(md5(random()::text || i || g), '') from generate_series(1, 300) g)
  from generate_series(1, 40) i;
create table retired(id int primary key);
insert into retired select generate_series(1, 10);
";

#[test]
fn data_diff_reads_only_changed_blocks_and_agrees_with_the_full_comparison() {
    let Some(env) = reflink_env() else { return };
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql("main", SETUP);
    // A settled database, as after pgbench -i: hint bits set and tuples frozen
    // (else the first read on each side rewrites every freshly loaded page).
    env.psql("main", "vacuum freeze");
    env.ok(&["branch", "create", "feature"]);
    env.ok(&["branch", "start", "feature"]);

    // A fresh clone: nothing differs, and nothing but the catalog had to be read.
    let (same, code) = data_diff(&env, "main", "feature", &[]);
    assert_eq!(
        (code, same["method"].as_str()),
        (0, Some("extents")),
        "{same:#}"
    );
    assert_eq!(same["tables"], Value::Array(vec![]), "{same:#}");
    let text = env.ok(&["diff", "--data", "main", "feature"]);
    assert!(text.contains("No data differences"), "{text}");

    env.psql(
        "feature",
        "insert into items values (20001, 'new a', 1), (20002, 'new b', 2), (20003, 'new c', 3);
         delete from items where id in (10, 15000);
         update items set name = name || ' (renamed)' where id in (20, 5000, 9000, 19999);
         update hot set v = v + 1 where id in (1, 2500, 4999);
         update tagged set payload = 'changed' where tag = 'tag-7' and n = 7;
         delete from tagged where tag = 'tag-8' and n = 8;
         insert into tagged values ('tag-new', 1, 'x');
         insert into nokey values (5, 'y5');
         delete from nokey where ctid = (select ctid from nokey where x = 6 limit 1);
         update docs set body = (select string_agg(md5(random()::text || g), '') from generate_series(1, 300) g) where id = 3;
         drop table retired;
         create table fresh(id int primary key); insert into fresh values (1), (2);",
    );
    env.psql("feature", "vacuum items");
    env.psql("feature", "vacuum full tagged");
    // HOT really was HOT (the table's fill factor left room), and the parent
    // keeps being written after the fork, and vacuumed.
    assert_eq!(
        env.psql(
            "feature",
            "select n_tup_hot_upd from pg_stat_user_tables where relname = 'hot'"
        ),
        "3"
    );
    env.psql("main", "update items set qty = qty + 100 where id = 100");
    env.psql("main", "vacuum hot");

    let (fast, code) = data_diff(&env, "main", "feature", &[]);
    assert_eq!(code, 1, "{fast:#}");
    assert_eq!(fast["method"], "extents", "{fast:#}");
    let expected: BTreeMap<String, (u64, u64, u64)> = [
        ("public.docs", (0, 0, 1)),
        ("public.fresh", (2, 0, 0)),
        ("public.hot", (0, 0, 3)),
        ("public.items", (3, 2, 5)),
        ("public.nokey", (1, 1, 0)),
        ("public.retired", (0, 10, 0)),
        ("public.tagged", (1, 1, 1)),
    ]
    .into_iter()
    .map(|(t, c)| (t.to_string(), c))
    .collect();
    assert_eq!(counts(&fast), expected, "{fast:#}");

    // Only changed blocks were read of the big table; the rewritten one whole.
    let items = table(&fast, "public.items");
    assert_eq!(items["method"], "extents", "{items:#}");
    let (read, total) = (
        items["blocks_read"].as_u64().unwrap(),
        items["blocks_total"].as_u64().unwrap(),
    );
    assert!(
        total > 100 && read * 4 < total,
        "read {read} of {total} blocks"
    );
    assert_eq!(
        table(&fast, "public.tagged")["method"],
        "full",
        "VACUUM FULL moved it"
    );
    assert_eq!(table(&fast, "public.retired")["only_in"], "a");
    assert_eq!(table(&fast, "public.nokey")["key"], Value::Array(vec![]));
    assert_eq!(
        table(&fast, "public.tagged")["key"],
        serde_json::json!(["tag", "n"])
    );

    // Samples show the changed columns only, keyed by the primary key.
    let samples = items["samples"].as_array().unwrap();
    let renamed = samples
        .iter()
        .find(|s| s["change"] == "changed" && s["key"]["id"] == 20)
        .unwrap_or_else(|| panic!("{samples:#?}"));
    assert_eq!(renamed["columns"]["name"]["from"], "item 20");
    assert_eq!(renamed["columns"]["name"]["to"], "item 20 (renamed)");
    assert!(renamed["columns"].get("qty").is_none(), "{renamed}");
    let parent_side = samples.iter().find(|s| s["key"]["id"] == 100).unwrap();
    assert_eq!(parent_side["columns"]["qty"]["from"], 102);
    assert_eq!(parent_side["columns"]["qty"]["to"], 2);

    // The same answer reading everything.
    let (full, code) = data_diff(&env, "main", "feature", &["--full", "--limit", "50"]);
    assert_eq!((code, full["method"].as_str()), (1, Some("full")));
    assert_eq!(counts(&full), expected, "{full:#}");
    assert_eq!(full["why_full"], "--full");

    // --limit caps the samples; --table picks one table (by bare or full name).
    let (one, _) = data_diff(&env, "main", "feature", &["--table", "hot", "--limit", "1"]);
    assert_eq!(counts(&one).keys().collect::<Vec<_>>(), ["public.hot"]);
    assert_eq!(
        table(&one, "public.hot")["samples"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (one, _) = data_diff(&env, "main", "feature", &["--table", "public.nokey"]);
    assert_eq!(counts(&one)["public.nokey"], (1, 1, 0));

    // Plain text and markdown say the same.
    let out = env.run(&["diff", "--data", "main", "feature"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("public.items: 3 added, 2 removed, 5 changed (by id; read "),
        "{text}"
    );
    assert!(
        text.contains("~ id=20: name \"item 20\" → \"item 20 (renamed)\""),
        "{text}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("comparing database"),
        "names the database"
    );
    let md = env.ok_code(
        &["diff", "--data", "main", "feature", "--format", "markdown"],
        1,
    );
    assert!(
        md.starts_with("### Data diff: `main` → `feature` (database `"),
        "{md}"
    );
    assert!(
        md.contains("| `public.items` | 3 | 2 | 5 | by id; read "),
        "{md}"
    );
    for expected in [
        "<details><summary>Sample rows</summary>",
        "~ tag=\"tag-7\", n=7: payload \"8f14e45fceea167a5a36dedd4bea2543\" → \"changed\"",
        "+ {\"x\":5,\"y\":\"y5\"}",
        "- {\"x\":6,\"y\":\"y6\"}",
        "… (9602 characters)",
    ] {
        assert!(md.contains(expected), "missing {expected:?} in {md}");
    }
}

#[test]
fn data_diff_bad_input_says_what_to_do() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create table t(id int primary key); insert into t values (1)",
    );
    env.ok(&["branch", "create", "feature"]);

    let out = env.run(&["diff", "--data", "main", "nosuch"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("branch \"nosuch\" does not exist"), "{err}");

    let out = env.run(&["diff", "--data", "main", "feature", "--table", "nothing"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "--table nothing: no table of that name in \"main\" or \"feature\" (tables: public.t)"
        ),
        "{err}"
    );

    // A full copy (no copy-on-write here) is compared row by row, and says so.
    env.psql("feature", "insert into t values (2)");
    let (diff, code) = data_diff(&env, "main", "feature", &[]);
    assert_eq!(
        (code, diff["method"].as_str()),
        (1, Some("full")),
        "{diff:#}"
    );
    assert!(diff["why_full"].as_str().is_some(), "{diff:#}");
    assert_eq!(counts(&diff)["public.t"], (1, 0, 0));
}

#[test]
fn schema_diff_as_markdown_for_a_pull_request_comment() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql("main", "create table users(id int primary key)");
    env.ok(&["branch", "create", "feature"]);
    let md = env.ok(&["diff", "main", "feature", "--format", "markdown"]);
    assert!(md.contains("No schema differences."), "{md}");
    env.psql("feature", "alter table users add column email text");
    let md = env.ok_code(&["diff", "main", "feature", "--format", "markdown"], 1);
    assert!(
        md.starts_with("### Schema diff: `main` → `feature` (database `"),
        "{md}"
    );
    assert!(
        md.contains("1 added, 0 removed, 0 changed.\n\n```diff\n--- main\n+++ feature\n+ column public.users.email: text\n```\n"),
        "{md}"
    );
}

/// On Neon (the stand-in: real PostgreSQL computes) there are no files to
/// look at: every row is compared, and the output says why. A table the
/// role cannot read in full (row-level security forced on its owner; Neon's
/// owner role reads everything else) is an error naming it, not a silent gap.
#[test]
fn data_diff_on_neon_compares_every_row_and_names_unreadable_tables() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    let cloud =
        pgtwig_neon_standin::StandIn::with_computes(&env.repo.parent().unwrap().join("neon"));
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        format!(
            "project = \"shop\"\nbackend = \"neon\"\nroot_branch = \"main\"\n\
             [neon]\nproject_id = \"{}\"\napi_url = \"{}\"\nconnect = \"{}\"\nca_file = \"{}\"\n",
            cloud.project_id(),
            cloud.api_base(),
            cloud.proxy_addr(),
            cloud.ca_pem_path().display(),
        ),
    )
    .unwrap();
    let with_key = |args: &[&str]| {
        env.cmd(args)
            .env("NEON_API_KEY", cloud.api_key())
            .output()
            .unwrap()
    };
    assert!(with_key(&["trust"]).status.success());
    let direct = |branch: &str, sql: &str| common::psql(&cloud.direct_url(branch, "neondb"), sql);
    direct(
        "main",
        "create table t(id int primary key, v text); insert into t select i, 'v' || i from generate_series(1, 100) i;
         create table secret(id int); insert into secret values (1);
         alter table secret enable row level security, force row level security;",
    );
    assert!(with_key(&["branch", "create", "pr"]).status.success());
    direct("pr", "update t set v = 'changed' where id = 7");

    let out = with_key(&["diff", "--data", "main", "pr", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read every row of public.secret in branch \"main\" (no SELECT privilege, or row-level security hides rows from this role)"),
        "{err}"
    );

    let out = with_key(&["diff", "--data", "main", "pr", "--json", "--table", "t"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let diff: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(diff["method"], "full", "{diff:#}");
    assert!(
        diff["why_full"].as_str().unwrap().contains("Neon"),
        "{diff:#}"
    );
    assert_eq!(counts(&diff)["public.t"], (0, 0, 1));
    assert_eq!(
        table(&diff, "public.t")["samples"][0]["columns"]["v"]["to"],
        "changed"
    );
}
