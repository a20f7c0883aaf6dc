//! `pgtwig diff A B`: schema differences between real branches.

mod common;

use common::{Fs, TestEnv};

#[test]
fn diff_shows_a_branchs_migrations_against_its_parent() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create table users(id int primary key, email text not null); \
         create view active_users as select id from users; \
         create function greet(n text) returns text language sql as $$ select 'hi ' || n $$",
    );
    env.ok(&["branch", "create", "feature"]);
    let same = env.run(&["diff", "main", "feature"]);
    assert_eq!(same.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&same.stdout).contains("No schema differences"));

    // The feature branch's "migration".
    env.psql(
        "feature",
        "alter table users add column name text default 'x'; \
         alter table users alter column email type varchar(200); \
         create unique index users_email_key on users(email); \
         drop view active_users; \
         create or replace function greet(n text) returns text language sql as $$ select 'hello ' || n $$; \
         create table orders(id bigserial primary key, user_id int references users(id))",
    );
    let out = env.run(&["diff", "main", "feature"]);
    assert_eq!(out.status.code(), Some(1), "exit 1 when they differ");
    let text = String::from_utf8(out.stdout).unwrap();
    for expected in [
        "--- main\n+++ feature\n",
        "+ column public.users.name: text default 'x'::text",
        "- column public.users.email: text not null\n+ column public.users.email: character varying(200) not null",
        "+ index public.users_email_key: CREATE UNIQUE INDEX users_email_key ON public.users USING btree (email)",
        "- view public.active_users:",
        "+ table public.orders: table",
        "+ constraint public.orders.orders_user_id_fkey: FOREIGN KEY (user_id) REFERENCES users(id)",
        "+ sequence public.orders_id_seq: bigint",
        "- function public.greet(n text):",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&env.ok_code(&["diff", "main", "feature", "--json"], 1)).unwrap();
    let names = |k: &str| -> Vec<String> {
        json[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                format!(
                    "{} {}",
                    o["kind"].as_str().unwrap(),
                    o["name"].as_str().unwrap()
                )
            })
            .collect()
    };
    assert!(
        names("added").contains(&"table public.orders".to_string()),
        "{json}"
    );
    assert!(
        names("removed").contains(&"view public.active_users".to_string()),
        "{json}"
    );
    assert!(
        names("changed").contains(&"function public.greet(n text)".to_string()),
        "{json}"
    );

    // Errors are not differences: exit 2 with a message.
    let err = env.run(&["diff", "main", "nosuch"]);
    assert_eq!(err.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&err.stderr).contains("\"nosuch\" does not exist"));
}
