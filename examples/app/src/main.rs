//! A tiny to-do app with one fixed `DATABASE_URL`, to show pgtwig switching databases with git.
//!
//! It never knows which branch it talks to: `pgtwig up` routes `localhost:5432` to the active
//! database branch, and `git checkout` changes which one that is.

use std::process::ExitCode;

use tokio_postgres::{Client, NoTls};

const DEFAULT_URL: &str = "postgres://postgres@localhost:5432/app";

const USAGE: &str = "usage: pgtwig-example-app <command>

commands:
  migrate     create the tables and apply pending migrations (safe to repeat)
  add TEXT    add a to-do
  list        list the to-dos
  whoami      print the database and the pgtwig branch that answered

DATABASE_URL (default postgres://postgres@localhost:5432/app) says where to connect.";

/// Numbered migrations, applied in order, each once, recorded in `schema_migrations`.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "create table todos (id bigserial primary key, text text not null, \
         created_at timestamptz not null default now())",
    ),
    (
        2,
        "alter table todos add column done boolean not null default false",
    ),
];

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first().map(String::as_str) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if matches!(command, "-h" | "--help" | "help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if !matches!(command, "migrate" | "add" | "list" | "whoami") {
        eprintln!("error: unknown command {command:?}\n\n{USAGE}");
        return ExitCode::from(2);
    }
    match run(command, &args[1..]).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: &str, rest: &[String]) -> Result<(), String> {
    let text = rest.join(" ");
    if command == "add" && text.trim().is_empty() {
        return Err("`add` needs the to-do's text, e.g. `add buy milk`".into());
    }
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_string());
    let (mut client, connection) = tokio_postgres::connect(&url, NoTls).await.map_err(|e| {
        // A server error came from Postgres (or pgtwig's proxy, with a hint); anything else
        // means nothing answered.
        let message = describe(&e);
        let hint = if e.as_db_error().is_some() {
            ""
        } else if message.contains("TLS") {
            "\nthis app connects without TLS: drop sslmode=require from the URL"
        } else {
            "\nis `pgtwig up` running?"
        };
        format!(
            "cannot connect to DATABASE_URL={}: {}{hint}",
            redact(&url),
            message
        )
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("error: connection lost: {}", describe(&e));
        }
    });
    let missing_table = |e: tokio_postgres::Error| match e.code() {
        Some(code) if code.code() == "42P01" => {
            "table `todos` does not exist on this branch: run `migrate` first".to_string()
        }
        _ => describe(&e),
    };
    match command {
        "migrate" => migrate(&mut client).await.map_err(|e| describe(&e)),
        "add" => {
            let row = client
                .query_one(
                    "insert into todos (text) values ($1) returning id",
                    &[&text],
                )
                .await
                .map_err(missing_table)?;
            let id: i64 = row.get(0);
            println!("added #{id} on branch {}", branch_of(&client).await);
            Ok(())
        }
        "list" => {
            let rows = client
                .query("select id, text, done from todos order by id", &[])
                .await
                .map_err(missing_table)?;
            println!(
                "to-dos on branch {} ({}):",
                branch_of(&client).await,
                rows.len()
            );
            for row in rows {
                let (id, text, done): (i64, String, bool) = (row.get(0), row.get(1), row.get(2));
                println!("  [{}] #{id} {text}", if done { "x" } else { " " });
            }
            Ok(())
        }
        _ => {
            let row = client
                .query_one(
                    "select current_database(), current_setting('data_directory', true)",
                    &[],
                )
                .await
                .map_err(|e| describe(&e))?;
            let database: String = row.get(0);
            let data_dir: Option<String> = row.get(1);
            println!("database: {database}");
            println!("branch:   {}", branch_name(data_dir.as_deref()));
            println!(
                "data dir: {}",
                data_dir.as_deref().unwrap_or("(not visible to this user)")
            );
            Ok(())
        }
    }
}

/// Applies pending migrations, each in its own transaction, under an advisory lock so two
/// concurrent `migrate` runs (say, a `post_create` hook and you) do not apply one twice.
async fn migrate(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(
            "create table if not exists schema_migrations \
             (version int primary key, applied_at timestamptz not null default now())",
        )
        .await?;
    let mut applied = 0;
    for (version, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        tx.execute("select pg_advisory_xact_lock(7463)", &[])
            .await?;
        let done = tx
            .query_opt(
                "select 1 from schema_migrations where version = $1",
                &[version],
            )
            .await?;
        if done.is_none() {
            tx.batch_execute(sql).await?;
            tx.execute(
                "insert into schema_migrations (version) values ($1)",
                &[version],
            )
            .await?;
            println!("applied migration {version}");
            applied += 1;
        }
        tx.commit().await?;
    }
    println!(
        "branch {}: {applied} migration(s) applied, schema up to date",
        branch_of(client).await
    );
    Ok(())
}

/// Which pgtwig branch answered: its data directory is `.../branches/<name>/data`.
async fn branch_of(client: &Client) -> String {
    let dir = client
        .query_one("select current_setting('data_directory', true)", &[])
        .await
        .ok()
        .and_then(|row| row.get::<_, Option<String>>(0));
    branch_name(dir.as_deref())
}

fn branch_name(data_dir: Option<&str>) -> String {
    let parsed = data_dir.and_then(|dir| {
        let (_, after) = dir.trim_end_matches('/').rsplit_once("/branches/")?;
        after
            .strip_suffix("/data")
            .filter(|name| !name.contains('/'))
            .map(str::to_string)
    });
    parsed.unwrap_or_else(|| "(unknown: not a pgtwig branch?)".to_string())
}

/// The error and its causes on one line; a server error with its SQLSTATE, detail and hint.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} ({}): {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            s += &format!("\n  detail: {detail}");
        }
        if let Some(hint) = db.hint() {
            s += &format!("\n  hint: {hint}");
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s += &format!(": {cause}");
        source = cause.source();
    }
    s
}

/// The URL with any password replaced by `***`, fit for error messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}
