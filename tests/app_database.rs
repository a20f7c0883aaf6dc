//! The app's database (`database` in .pgtwig.toml) on every branch: an
//! import from a password-protected server whose database has another name
//! lands in it, and `diff`, `anonymize --check`, `post_create`, `branch url`,
//! `pr open`, `pgtwig url` and `pgtwig up` all use it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{git, Fs, TestEnv};

/// A "production" PostgreSQL of its own, outside pgtwig: initdb'd here with
/// scram-sha-256 for every connection, listening on a free loopback port;
/// role `app` (password `pw`) owns database `prod`, which has 100 users.
struct Production {
    _dir: tempfile::TempDir,
    server: Child,
    port: u16,
}

const SUPERUSER_PASSWORD: &str = "super-secret";

impl Production {
    fn start() -> Production {
        let dir = tempfile::Builder::new()
            .prefix("pgtwig-prod-")
            .tempdir()
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // Servers do not run as root: the user pgtwig would run them as.
        let user = pgtwig_local::server_user::ServerUser::resolve(dir.path()).unwrap();
        let pg = pgtwig_local::pgbin::newest().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        user.own(&data).unwrap();
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).unwrap();
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = user
            .command(&pg.bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=scram-sha-256", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .env_remove("PGDATA")
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {out:?}");
        let port = common::free_port();
        let server = user
            .command(&pg.bin("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "unix_socket_directories="])
            .env_remove("PGDATA")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let prod = Production {
            _dir: dir,
            server,
            port,
        };
        let admin = prod.url("postgres", SUPERUSER_PASSWORD, "postgres");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !Command::new("psql")
            .args([&admin, "-X", "-qAtc", "select 1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
        {
            assert!(Instant::now() < deadline, "production server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        common::psql(&admin, "create role app login password 'pw'");
        common::psql(&admin, "create database prod owner app");
        common::psql(
            &prod.url("app", "pw", "prod"),
            "create table users(id int primary key, email text not null, name text); \
             insert into users select g, 'u' || g || '@corp.example', 'User ' || g from generate_series(1, 100) g",
        );
        prod
    }

    fn url(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{database}",
            self.port
        )
    }
}

impl Drop for Production {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.server.id() as i32),
            nix::sys::signal::Signal::SIGQUIT,
        );
        let _ = self.server.wait();
    }
}

/// The database a connection string names: the path after the host
/// (`postgresql://postgres@/app?host=…`, `postgres://u:p@h:5432/app`).
fn dbname_of(url: &str) -> String {
    let rest = url.split_once("://").unwrap().1;
    let path = rest.split_once('/').unwrap().1;
    path.split('?').next().unwrap().to_string()
}

fn reflink_env() -> Option<TestEnv> {
    let env = TestEnv::new(Fs::Reflink);
    if env.is_none() && std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true: these tests need PGTWIG_TEST_REFLINK_DIR on a copy-on-write file system");
    }
    env
}

/// `pgtwig up` on a free port; returns it and the line naming DATABASE_URL.
fn up_with_url(env: &TestEnv) -> (common::Daemon, String) {
    let port = common::free_port();
    let mut child = env
        .cmd(&["up", "--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut url_line = String::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        if line.contains("DATABASE_URL=") {
            url_line = line.trim().to_string();
            break;
        }
        line.clear();
    }
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    (common::Daemon { child, port }, url_line)
}

const CONFIG: &str = "project = \"shop\"\ndatabase = \"app\"\n\
    [[map]]\ngit = \"*\"\nbranch = \"{branch}\"\n\
    post_create = [\"echo \\\"$DATABASE_URL\\\" > ../post-create-url\", \
    \"psql \\\"$DATABASE_URL\\\" -qc 'create table made_by_post_create()'\"]\n";

#[test]
fn import_diff_check_post_create_and_urls_use_the_apps_database() {
    let Some(env) = reflink_env() else { return };
    let prod = Production::start();
    std::fs::write(env.repo.join(".pgtwig.toml"), CONFIG).unwrap();
    git(&env, &["add", ".pgtwig.toml"]);
    git(&env, &["commit", "-qm", "pgtwig"]);
    let out = env.init();
    assert!(out.contains("with database \"app\""), "{out}");
    assert!(out.contains("localhost:5432/app"), "{out}");

    // The root has the app's database from the start; mark its other one.
    env.ok(&["branch", "start", "main"]);
    let main_url = env.url("main");
    assert_eq!(dbname_of(&main_url), "app", "{main_url}");
    let main_postgres = env
        .ok(&["branch", "url", "main", "--database", "postgres"])
        .trim()
        .to_string();
    common::psql(
        &main_postgres,
        "create table kept_by_import(n int); insert into kept_by_import values (7)",
    );
    // What an older pgtwig left: the source restored under its own name.
    common::psql(&main_postgres, "create database prod");

    // The source checks passwords.
    let err = env.fails(&["import", "--from", &prod.url("app", "wrong", "prod")]);
    assert!(err.contains("authentication failed"), "{err}");
    let out = env.ok(&["import", "--from", &prod.url("app", "pw", "prod")]);
    assert!(
        out.contains(
            "Restored database \"prod\" of the source into database \"app\" of branch \"main\""
        ),
        "{out}"
    );
    assert!(
        out.contains("Branch \"main\" also has a database \"prod\""),
        "{out}"
    );
    assert_eq!(common::psql(&main_url, "select count(*) from users"), "100");
    assert_eq!(
        common::psql(&main_postgres, "select n from kept_by_import"),
        "7",
        "the branch's other databases are as they were"
    );
    assert_eq!(
        common::psql(
            &main_postgres,
            "select count(*) from pg_class where relname = 'users'"
        ),
        "0",
        "the source went into the app's database only"
    );

    // A checkout makes a branch; its approved post_create gets the app's database.
    env.ok(&["trust"]);
    let out = git(&env, &["checkout", "-qb", "feature"]);
    assert!(out.contains("created database branch \"feature\""), "{out}");
    let seen = std::fs::read_to_string(env.repo.parent().unwrap().join("post-create-url"))
        .unwrap_or_else(|e| panic!("post_create did not run ({e}): {out}"));
    assert_eq!(dbname_of(seen.trim()), "app", "{seen}");
    let feature_url = env.url("feature");
    assert_eq!(
        common::psql(
            &feature_url,
            "select count(*) from pg_class where relname = 'made_by_post_create'"
        ),
        "1",
        "post_create's table is in the app's database"
    );
    assert_eq!(
        common::psql(&feature_url, "select count(*) from users"),
        "100"
    );

    // The branch's migration shows in `diff` without naming the database.
    common::psql(&feature_url, "alter table users add column nickname text");
    let out = env.run(&["diff", "main", "feature"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("+ column public.users.nickname: text"),
        "{stdout}"
    );
    assert!(stderr.contains("database \"app\""), "{stderr}");
    let out = env.ok_code(&["diff", "main", "feature", "--database", "postgres"], 0);
    assert!(out.contains("(database \"postgres\")"), "{out}");
    let err = env.fails(&["diff", "main", "feature", "--database", "nosuch"]);
    assert!(
        err.contains("branch \"main\" has no database \"nosuch\""),
        "{err}"
    );

    // --check: the app's database against the rules, every other one as a whole.
    let out = env.run(&["anonymize", "--check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("database \"app\" (the app's, from .pgtwig.toml) on \"main\": columns that look like personal data")
            && text.contains("\"public.users.email\"")
            && text.contains("database \"postgres\" on \"main\": no column looks like personal data"),
        "{text}"
    );
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        format!("{CONFIG}[anonymize.columns]\n\"public.users.email\" = \"email\"\n\"public.users.name\" = \"name\"\n"),
    )
    .unwrap();
    common::psql(&main_postgres, "create table contacts(phone text)");
    let out = env.run(&["anonymize", "--check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "PII in another database: {text}"
    );
    assert!(
        text.contains("on \"main\": every column that looks like personal data has a masking rule")
            && text.contains(
                "database \"postgres\" on \"main\": columns that look like personal data"
            )
            && text.contains("\"public.contacts.phone\""),
        "{text}"
    );
    common::psql(&main_postgres, "drop table contacts");
    env.ok_code(&["anonymize", "--check"], 0);

    // Every URL pgtwig prints names the app's database, and says so.
    let out = env.run(&["branch", "url", "feature"]);
    assert_eq!(
        dbname_of(String::from_utf8_lossy(&out.stdout).trim()),
        "app"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("database \"app\""));
    let out = env.run(&["pr", "open", "7"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        dbname_of(String::from_utf8_lossy(&out.stdout).trim()),
        "app"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("database \"app\""));
    let pr_url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(common::psql(&pr_url, "select count(*) from users"), "100");
    let proxied = env.ok(&["url"]);
    assert!(proxied.trim().ends_with("/app"), "{proxied}");
    let pinned = env.ok(&["url", "main"]);
    assert!(pinned.trim().ends_with("/app%40main"), "{pinned}");

    // The proxy: the URL `pgtwig up` prints reaches the app's data.
    let (daemon, line) = up_with_url(&env);
    assert!(line.contains(&format!(":{}/app ", daemon.port)), "{line}");
    let app_url = format!("postgres://postgres@127.0.0.1:{}/app", daemon.port);
    assert_eq!(
        common::psql(
            &app_url,
            "select count(*) from users where nickname is null"
        ),
        "100",
        "the active branch is feature, with its new column"
    );
}

#[test]
fn init_names_the_apps_database() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    let out = env.ok(&["init", "--database", "shop_dev"]);
    assert!(out.contains("with database \"shop_dev\""), "{out}");
    // The developer's own overrides stay out of commits.
    assert!(
        out.contains("Added .pgtwig.local.toml to .gitignore"),
        "{out}"
    );
    let ignore = std::fs::read_to_string(env.repo.join(".gitignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l == "/.pgtwig.local.toml"),
        "{ignore}"
    );
    let config = std::fs::read_to_string(env.repo.join(".pgtwig.toml")).unwrap();
    assert!(config.contains("\ndatabase = \"shop_dev\"\n"), "{config}");
    env.ok(&["branch", "start", "main"]);
    let url = env.url("main");
    assert_eq!(dbname_of(&url), "shop_dev");
    assert_eq!(common::psql(&url, "select current_database()"), "shop_dev");
    // Branches inherit it.
    env.ok(&["branch", "create", "feature"]);
    env.ok(&["branch", "start", "feature"]);
    assert_eq!(
        common::psql(&env.url("feature"), "select current_database()"),
        "shop_dev"
    );
    // A config that says otherwise is not overridden by a flag.
    let err = env.fails(&["init", "--database", "other"]);
    assert!(
        err.contains("says the app's database is \"shop_dev\""),
        "{err}"
    );
    // A root made before the config named a database gets it on the next init.
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        config.replace("database = \"shop_dev\"", "database = \"later\""),
    )
    .unwrap();
    let out = env.init();
    assert!(
        out.contains("Created database \"later\" (the app's) in root branch \"main\""),
        "{out}"
    );
    assert_eq!(
        common::psql(&env.url("main"), "select current_database()"),
        "later"
    );
}

/// Every branch has the app's database: one made from a parent that predates `database` in
/// .pgtwig.toml gets it (saying so), and its own children then inherit the record, so they
/// are made without being started.
#[test]
fn branches_from_a_parent_without_the_apps_database_get_it() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "create", "legacy"]);
    let config = std::fs::read_to_string(env.repo.join(".pgtwig.toml")).unwrap();
    assert!(config.contains("\ndatabase = \"postgres\"\n"), "{config}");
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        config.replace("database = \"postgres\"", "database = \"app\""),
    )
    .unwrap();

    let out = env.ok(&["branch", "create", "feature", "--from", "legacy"]);
    assert!(
        out.contains("created database \"app\" on \"feature\""),
        "{out}"
    );
    let url = env.url("feature");
    assert_eq!(dbname_of(&url), "app");
    assert_eq!(common::psql(&url, "select current_database()"), "app");

    let out = env.ok(&["branch", "create", "child", "--from", "feature"]);
    assert!(!out.contains("created database"), "{out}");
    assert_eq!(
        env.branch_json("child")["running"],
        false,
        "known to hold it: not started to check"
    );
    env.ok(&["branch", "start", "child"]);
    assert_eq!(
        common::psql(&env.url("child"), "select current_database()"),
        "app"
    );

    let out = env.run(&["pr", "open", "7", "--from", "legacy"]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("created database \"app\" on \"pr-7\""),
        "{stderr}"
    );
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(common::psql(&url, "select current_database()"), "app");

    // status names it.
    let text = env.ok(&["status"]);
    assert!(
        text.contains("App database: \"app\" (the app's, from .pgtwig.toml)"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert_eq!(json["database"], "app");
}
