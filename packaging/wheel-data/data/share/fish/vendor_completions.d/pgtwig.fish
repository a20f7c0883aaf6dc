# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_pgtwig_global_optspecs
    string join \n h/help V/version
end

function __fish_pgtwig_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_pgtwig_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_pgtwig_using_subcommand
    set -l cmd (__fish_pgtwig_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c pgtwig -n "__fish_pgtwig_needs_command" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -s V -l version -d 'Print version'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "init" -d 'Set up pgtwig in this git repository: write .pgtwig.toml, create the root branch'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "branch" -d 'Create, list, delete, reset, start and stop database branches'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "up" -d 'Run the proxy: the app\'s fixed DATABASE_URL reaches the active branch'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "down" -d 'Stop the proxy (and the branches\' servers, unless --keep-running)'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "use" -d 'Make a branch the active one: new proxy connections go to it'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "status" -d 'Show the active branch, the proxy and its sessions'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "url" -d 'Print a DATABASE_URL through the proxy with the proxy password (for other users, containers)'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "env" -d 'Print DATABASE_URL=… for this work tree (for .env files; --export for direnv and shells)'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "run" -d 'Run a command with DATABASE_URL set for this work tree: `pgtwig run -- CMD ARGS…`'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "pr" -d 'Branches for pull requests (CI): pr-NUMBER'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "gc" -d 'Delete branches whose git branch is gone or whose TTL passed (--history: prune history instead)'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "import" -d 'Seed or refresh a branch (default: the root) from a real database'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "anonymize" -d 'Make a branch with personal data masked (rules in [anonymize] of .pgtwig.toml)'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "diff" -d 'Schema difference between two branches (exit 1 when they differ)'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "check" -d 'Run a migration command on a throwaway clone and report rewrites, locks and risky DDL (exit 1 on a failing rule)'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "trust" -d 'Approve the commands this repository\'s config runs (post_create); --list, --revoke'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "uninstall" -d 'Remove pgtwig\'s git hook (restoring the hook that was there before)'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "doctor" -d 'Check this machine and project: server binaries, copy-on-write, disk, port, hook, daemon'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "completions" -d 'Print a shell completion script (bash, zsh, fish, elvish, powershell)'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "man" -d 'Print pgtwig\'s man page (--dir: write one per subcommand)'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "hook" -d 'Entry points for git hooks (installed by `pgtwig init`)'
complete -c pgtwig -n "__fish_pgtwig_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand init" -l name -d 'Project name (default: the repository folder\'s name)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand init" -l root -d 'Name of the root branch (default: main, or the Neon project\'s default branch)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand init" -l database -d 'The app\'s database, made in the root branch (default: postgres; on Neon, neondb)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand init" -l neon-project -d 'Keep the branches in this Neon project (backend = "neon") instead of on this machine' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand init" -l neon-api-url -d 'Neon\'s API (only for a regional or test API)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand init" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and not __fish_seen_subcommand_from create list delete reset start snapshot stop url help" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and not __fish_seen_subcommand_from create list delete reset start snapshot stop url help" -f -a "create" -d 'Create a branch: a copy-on-write clone of its parent\'s current state'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and not __fish_seen_subcommand_from create list delete reset start snapshot stop url help" -f -a "list" -d 'List branches as their parent tree: git branch, running, sessions, protected/TTL, own and shared bytes, history (--json: every field)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and not __fish_seen_subcommand_from create list delete reset start snapshot stop url help" -f -a "delete" -d 'Delete a branch and its data (never the root; children keep working)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and not __fish_seen_subcommand_from create list delete reset start snapshot stop url help" -f -a "reset" -d 'Re-derive a branch from its parent\'s current state, under the same name'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and not __fish_seen_subcommand_from create list delete reset start snapshot stop url help" -f -a "start" -d 'Start a branch\'s PostgreSQL server'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and not __fish_seen_subcommand_from create list delete reset start snapshot stop url help" -f -a "snapshot" -d 'Take a history base snapshot of a running branch if one is due (run in the background by `start`)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and not __fish_seen_subcommand_from create list delete reset start snapshot stop url help" -f -a "stop" -d 'Stop a branch\'s PostgreSQL server (fast shutdown)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and not __fish_seen_subcommand_from create list delete reset start snapshot stop url help" -f -a "url" -d 'Print a connection string straight to a branch\'s server (its Unix socket)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and not __fish_seen_subcommand_from create list delete reset start snapshot stop url help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from create" -l from -d 'The branch to derive from (default: the root branch)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from create" -l at -d 'As the parent was then, within history_retention: a time with its zone (2026-11-28T10:15:00Z, 2026-11-28T10:15:00+01:00), relative (now-10m, "10 minutes ago") or an LSN (0/3000060)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from create" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from list" -l json
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from delete" -l force -d 'Also when it is a work tree\'s active branch: that work tree falls back to the parent its [[map]] rule gives (else the root) and its sessions are ended'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from delete" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from reset" -l keep-old -d 'Keep the old state as a new branch with this name instead of deleting it' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from reset" -l force -d 'Also when it is a work tree\'s active branch: its data is replaced under the running app, whose sessions are ended at their next transaction boundary'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from reset" -l post-create -d 'Then run the post_create commands of the [[map]] rule that made it again (migrations, seeds), if `pgtwig trust` approved them'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from reset" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from start" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from snapshot" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from stop" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from url" -l database -d 'Database name in the URL (default: the app\'s, `database` in .pgtwig.toml)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from url" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from help" -f -a "create" -d 'Create a branch: a copy-on-write clone of its parent\'s current state'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from help" -f -a "list" -d 'List branches as their parent tree: git branch, running, sessions, protected/TTL, own and shared bytes, history (--json: every field)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from help" -f -a "delete" -d 'Delete a branch and its data (never the root; children keep working)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from help" -f -a "reset" -d 'Re-derive a branch from its parent\'s current state, under the same name'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from help" -f -a "start" -d 'Start a branch\'s PostgreSQL server'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from help" -f -a "snapshot" -d 'Take a history base snapshot of a running branch if one is due (run in the background by `start`)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from help" -f -a "stop" -d 'Stop a branch\'s PostgreSQL server (fast shutdown)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from help" -f -a "url" -d 'Print a connection string straight to a branch\'s server (its Unix socket)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand branch; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand up" -l port -d 'Port to listen on (overrides `listen` in .pgtwig.toml; same address)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand up" -l listen -d 'Address to listen on, e.g. localhost:5432 (127.0.0.1 and ::1), 127.0.0.1:5432 or 172.17.0.1:5432 for containers (overrides .pgtwig.toml)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand up" -s d -l detach -d 'Run in the background; logs go to the project\'s daemon.log'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand up" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand down" -l keep-running -d 'Leave the branches\' servers running (default: stop them too)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand down" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand use" -l worktree -d 'The work tree whose branch this sets (default: the one you are in)' -r -F
complete -c pgtwig -n "__fish_pgtwig_using_subcommand use" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand status" -l json
complete -c pgtwig -n "__fish_pgtwig_using_subcommand status" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand url" -l database -d 'Database in the URL (default: the project\'s)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand url" -l host -d 'Host in the URL, e.g. host.docker.internal for a container (default: where the proxy listens)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand url" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand env" -l database -d 'Database in the URL (default: the project\'s)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand env" -l export -d 'Print `export DATABASE_URL=\'…\'` (for `eval "$(pgtwig env --export)"` in a shell or .envrc)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand env" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand run" -l database -d 'Database in the URL (default: the project\'s)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand run" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand pr; and not __fish_seen_subcommand_from open close help" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand pr; and not __fish_seen_subcommand_from open close help" -f -a "open" -d 'Create branch pr-NUMBER (once) and print its connection string'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand pr; and not __fish_seen_subcommand_from open close help" -f -a "close" -d 'Delete branch pr-NUMBER (if it exists)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand pr; and not __fish_seen_subcommand_from open close help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand pr; and __fish_seen_subcommand_from open" -l from -d 'Parent branch (default: "staging" if it exists, else the root)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand pr; and __fish_seen_subcommand_from open" -l ttl -d 'Delete it with `pgtwig gc` after this long (e.g. 7d, 12h)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand pr; and __fish_seen_subcommand_from open" -l database -d 'Database name in the printed URL (default: the app\'s, `database` in .pgtwig.toml)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand pr; and __fish_seen_subcommand_from open" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand pr; and __fish_seen_subcommand_from close" -l force -d 'Also when it is a work tree\'s active branch (that work tree falls back to its rule\'s parent, else the root)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand pr; and __fish_seen_subcommand_from close" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand pr; and __fish_seen_subcommand_from help" -f -a "open" -d 'Create branch pr-NUMBER (once) and print its connection string'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand pr; and __fish_seen_subcommand_from help" -f -a "close" -d 'Delete branch pr-NUMBER (if it exists)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand pr; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand gc" -l older-than -d 'With --history: what is older than this ("2h", "3d"; "0": all of it; default: history_retention)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand gc" -l dry-run -d 'Only list what would be deleted'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand gc" -l history -d 'Remove point-in-time history (WAL archive, base snapshots) instead of branches'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand gc" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand import" -l from -d 'The source database, e.g. postgres://user:password@host:5432/app (read only)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand import" -l into -d 'The branch to seed or refresh (default: the root branch)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand import" -l database -d 'The branch\'s database to fill (default: the app\'s, `database` in .pgtwig.toml)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand import" -l exclude-table-data -d 'Copy this table\'s definition but not its rows (pg_dump pattern; repeatable)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand import" -l jobs -d 'Parallel jobs for dump and restore (default: number of CPUs)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand import" -l keep-old -d 'Keep the branch\'s previous state as this branch when it has data (default: `<branch>-before-import`)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand import" -l schema-only -d 'Tables, views, functions… but no rows'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand import" -l replace -d 'Drop the branch\'s previous data instead of keeping it as a branch'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand import" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand anonymize" -l from -d 'The branch holding the original data (default: the root branch)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand anonymize" -l into -d 'The anonymized branch to make' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand anonymize" -l database -d 'Database the rules apply to (default: the app\'s, `database` in .pgtwig.toml)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand anonymize" -l check -d 'Only list columns that look like personal data and have no rule (exit 1 if any)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand anonymize" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand diff" -l database -d 'Database to compare in both branches (default: the app\'s, `database` in .pgtwig.toml)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand diff" -l format -d '`markdown`: GitHub-flavoured, for a pull request comment' -r -f -a "text\t''
markdown\t''"
complete -c pgtwig -n "__fish_pgtwig_using_subcommand diff" -l table -d 'With --data: only this table (`schema.name`, or `name` in any schema)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand diff" -l limit -d 'With --data: sample rows shown per table' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand diff" -l json -d 'Print the difference as JSON (added, removed, changed)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand diff" -l data -d 'Compare the rows of every table (added, removed, changed by primary key) instead of the schema'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand diff" -l full -d 'With --data: read and compare every row, even blocks both branches still share'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand diff" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand check" -l branch -d 'The branch to clone (default: this work tree\'s active branch). It is never written' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand check" -l keep -d 'Keep the clone afterwards as this branch' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand check" -l database -d 'The database the command migrates (default: the app\'s, `database` in .pgtwig.toml)' -r
complete -c pgtwig -n "__fish_pgtwig_using_subcommand check" -l format -d 'human (default), json, or markdown (GitHub-flavoured, for a pull request comment)' -r -f -a "human\t''
json\t''
markdown\t''"
complete -c pgtwig -n "__fish_pgtwig_using_subcommand check" -l json -d 'Print the report as JSON (same as --format json)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand check" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand trust" -l list -d 'Show the approved command lists of this repository (and what still needs approval)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand trust" -l revoke -d 'Forget every approval for this repository'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand trust" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand uninstall" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand doctor" -l json -d 'Print the findings as JSON ({"ok": bool, "findings": [...]})'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand doctor" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand completions" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand man" -l dir -d 'Write pgtwig.1 and a page per subcommand (pgtwig-branch-create.1, ...) into this folder (e.g. ~/.local/share/man/man1) instead of printing pgtwig.1' -r -F
complete -c pgtwig -n "__fish_pgtwig_using_subcommand man" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand hook; and not __fish_seen_subcommand_from post-checkout help" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand hook; and not __fish_seen_subcommand_from post-checkout help" -f -a "post-checkout" -d 'Called by git\'s post-checkout hook: switch to (or create) the branch\'s database'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand hook; and not __fish_seen_subcommand_from post-checkout help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand hook; and __fish_seen_subcommand_from post-checkout" -s h -l help -d 'Print help'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand hook; and __fish_seen_subcommand_from help" -f -a "post-checkout" -d 'Called by git\'s post-checkout hook: switch to (or create) the branch\'s database'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand hook; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "init" -d 'Set up pgtwig in this git repository: write .pgtwig.toml, create the root branch'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "branch" -d 'Create, list, delete, reset, start and stop database branches'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "up" -d 'Run the proxy: the app\'s fixed DATABASE_URL reaches the active branch'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "down" -d 'Stop the proxy (and the branches\' servers, unless --keep-running)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "use" -d 'Make a branch the active one: new proxy connections go to it'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "status" -d 'Show the active branch, the proxy and its sessions'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "url" -d 'Print a DATABASE_URL through the proxy with the proxy password (for other users, containers)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "env" -d 'Print DATABASE_URL=… for this work tree (for .env files; --export for direnv and shells)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "run" -d 'Run a command with DATABASE_URL set for this work tree: `pgtwig run -- CMD ARGS…`'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "pr" -d 'Branches for pull requests (CI): pr-NUMBER'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "gc" -d 'Delete branches whose git branch is gone or whose TTL passed (--history: prune history instead)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "import" -d 'Seed or refresh a branch (default: the root) from a real database'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "anonymize" -d 'Make a branch with personal data masked (rules in [anonymize] of .pgtwig.toml)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "diff" -d 'Schema difference between two branches (exit 1 when they differ)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "check" -d 'Run a migration command on a throwaway clone and report rewrites, locks and risky DDL (exit 1 on a failing rule)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "trust" -d 'Approve the commands this repository\'s config runs (post_create); --list, --revoke'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "uninstall" -d 'Remove pgtwig\'s git hook (restoring the hook that was there before)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "doctor" -d 'Check this machine and project: server binaries, copy-on-write, disk, port, hook, daemon'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "completions" -d 'Print a shell completion script (bash, zsh, fish, elvish, powershell)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "man" -d 'Print pgtwig\'s man page (--dir: write one per subcommand)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "hook" -d 'Entry points for git hooks (installed by `pgtwig init`)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and not __fish_seen_subcommand_from init branch up down use status url env run pr gc import anonymize diff check trust uninstall doctor completions man hook help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and __fish_seen_subcommand_from branch" -f -a "create" -d 'Create a branch: a copy-on-write clone of its parent\'s current state'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and __fish_seen_subcommand_from branch" -f -a "list" -d 'List branches as their parent tree: git branch, running, sessions, protected/TTL, own and shared bytes, history (--json: every field)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and __fish_seen_subcommand_from branch" -f -a "delete" -d 'Delete a branch and its data (never the root; children keep working)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and __fish_seen_subcommand_from branch" -f -a "reset" -d 'Re-derive a branch from its parent\'s current state, under the same name'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and __fish_seen_subcommand_from branch" -f -a "start" -d 'Start a branch\'s PostgreSQL server'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and __fish_seen_subcommand_from branch" -f -a "snapshot" -d 'Take a history base snapshot of a running branch if one is due (run in the background by `start`)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and __fish_seen_subcommand_from branch" -f -a "stop" -d 'Stop a branch\'s PostgreSQL server (fast shutdown)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and __fish_seen_subcommand_from branch" -f -a "url" -d 'Print a connection string straight to a branch\'s server (its Unix socket)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and __fish_seen_subcommand_from pr" -f -a "open" -d 'Create branch pr-NUMBER (once) and print its connection string'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and __fish_seen_subcommand_from pr" -f -a "close" -d 'Delete branch pr-NUMBER (if it exists)'
complete -c pgtwig -n "__fish_pgtwig_using_subcommand help; and __fish_seen_subcommand_from hook" -f -a "post-checkout" -d 'Called by git\'s post-checkout hook: switch to (or create) the branch\'s database'
