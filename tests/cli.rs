//! The command line as an operator meets it: shell completion sourced in
//! bash, the manual page rendered by `man`, `config check` on the shipped
//! example configs and on broken files, exit codes per class against a
//! real agent, `lock release` without a token, `lock list` and `members`.
//!
//! `bash` and `man` are needed: without them a test is skipped with a note,
//! except under `CI`, where a missing tool fails (as `promtool` in metrics.rs).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{keygen, wait_for, Agent, BIN};

const LONG: Duration = Duration::from_secs(60);

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Whether `tool` runs; under CI a missing tool is a failure.
fn have(tool: &str, what: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !under_ci(),
            "CI is set and {tool} is not on PATH: {what} cannot be checked"
        );
        println!("note: {tool} is not on PATH: {what} skipped");
    }
    ok
}

fn cli(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RIFTMESH_API")
        .env_remove("RIFTMESH_CONFIG")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Run and check the exit status; returns (stdout, stderr).
#[track_caller]
fn expect(args: &[&str], code: i32) -> (String, String) {
    let o = cli(args);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(
        o.status.code(),
        Some(code),
        "riftmesh {}: exit {:?}, expected {code}\nstdout: {out}\nstderr: {err}",
        args.join(" "),
        o.status.code()
    );
    (out, err)
}

/// What bash completes for `words` (the last one being completed).
fn bash_complete(script: &Path, words: &str) -> Vec<String> {
    let o = Command::new("bash")
        .args(["--norc", "--noprofile", "-c"])
        .arg(
            r#"source "$1" || exit 3
fn=$(complete -p riftmesh | sed -n 's/.*-F \([^ ]*\) .*/\1/p')
[ -n "$fn" ] || { echo "no completion function registered for riftmesh" >&2; exit 4; }
read -r -a COMP_WORDS <<< "$2"
case "$2" in *" ") COMP_WORDS+=("");; esac
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMP_LINE="$2"
COMP_POINT=${#COMP_LINE}
"$fn" riftmesh "${COMP_WORDS[$COMP_CWORD]}" "${COMP_WORDS[$COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}""#,
        )
        .arg("bash")
        .arg(script)
        .arg(words)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "bash completion of {words:?}: {}",
        text(&o.stderr)
    );
    text(&o.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn bash_sources_the_completion_and_completes_subcommands() {
    if !have("bash", "the bash completion") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (script, _) = expect(&["completion", "bash"], 0);
    let path = dir.path().join("riftmesh.bash");
    std::fs::write(&path, script).unwrap();
    let mut got = bash_complete(&path, "riftmesh con");
    got.sort();
    assert_eq!(got, ["config", "consumer"], "riftmesh con<TAB>");
    let got = bash_complete(&path, "riftmesh conf");
    assert_eq!(got, ["config"], "riftmesh conf<TAB>");
    let got = bash_complete(&path, "riftmesh lock re");
    assert!(
        got.contains(&"release".to_string()) && got.contains(&"renew".to_string()),
        "riftmesh lock re<TAB>: {got:?}"
    );
    let got = bash_complete(&path, "riftmesh completion ");
    assert!(
        got.contains(&"zsh".to_string()),
        "riftmesh completion <TAB>: {got:?}"
    );
    // zsh and fish scripts come out too.
    for sh in ["zsh", "fish"] {
        let (s, _) = expect(&["completion", sh], 0);
        assert!(s.contains("config") && s.contains("lock"), "{sh}");
    }
    expect(&["completion", "tcsh"], 2);
}

#[test]
fn man_renders_the_page() {
    let (page, _) = expect(&["man"], 0);
    assert!(page.contains(".TH riftmesh 1"), "{}", &page[..200]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    expect(&["man", "--out-dir", out.to_str().unwrap()], 0);
    for p in [
        "riftmesh.1",
        "riftmesh-config-check.1",
        "riftmesh-lock-release.1",
    ] {
        assert!(out.join(p).is_file(), "{p} not written");
    }
    if !have("man", "rendering the manual page with man -l") {
        return;
    }
    let file = dir.path().join("riftmesh.1");
    std::fs::write(&file, &page).unwrap();
    let o = Command::new("man")
        .arg("-l")
        .arg(&file)
        .env("MANWIDTH", "100")
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .env("TERM", "dumb")
        .output()
        .unwrap();
    let shown = text(&o.stdout);
    assert!(o.status.success(), "man -l: {}", text(&o.stderr));
    // Rendered, not echoed: no roff requests left, the sections are there.
    assert!(!shown.contains(".TH") && !shown.contains(".SH"), "{shown}");
    for want in ["NAME", "SYNOPSIS", "completion", "config", "Exit status"] {
        assert!(
            shown.contains(want),
            "man -l output lacks {want:?}:\n{shown}"
        );
    }
    let errors = text(&o.stderr);
    assert!(
        !errors.contains("warning") && !errors.contains("error"),
        "man -l complained: {errors}"
    );
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn config_check_accepts_the_shipped_examples_and_points_at_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("swarm.key");
    keygen(&key);
    let key = key.to_str().unwrap();
    let examples = repo().join("deploy/examples");
    let mut hosts: Vec<PathBuf> = std::fs::read_dir(examples.join("hosts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    hosts.sort();
    assert!(hosts.len() >= 2, "{hosts:?}");
    for h in &hosts {
        let name = h.file_stem().unwrap().to_str().unwrap();
        let o = Command::new("bash")
            .arg(examples.join("render.sh"))
            .arg(name)
            .output()
            .unwrap();
        assert!(o.status.success(), "render.sh {name}");
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, &o.stdout).unwrap();
        // The examples name /etc/riftmesh/swarm.key: point at a real key.
        let (out, _) = expect(
            &[
                "config",
                "check",
                file.to_str().unwrap(),
                "--swarm-key",
                key,
            ],
            0,
        );
        assert!(out.contains(": valid"), "{out}");
        assert!(out.contains(&format!("name       {name}")), "{out}");
        // JSON for scripts.
        let (out, _) = expect(
            &[
                "config",
                "check",
                file.to_str().unwrap(),
                "--swarm-key",
                key,
                "--json",
            ],
            0,
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["valid"], true);
        assert_eq!(v["name"], name);
    }
    // The named swarm key must exist, as the agent requires.
    let file = dir.path().join(format!(
        "{}.toml",
        hosts[0].file_stem().unwrap().to_str().unwrap()
    ));
    let missing = dir.path().join("nokey");
    let (_, err) = expect(
        &[
            "config",
            "check",
            file.to_str().unwrap(),
            "--swarm-key",
            missing.to_str().unwrap(),
        ],
        2,
    );
    assert!(err.contains("swarm key"), "{err}");
    // A TOML mistake: its line and column.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"gpu-01\"\nmdns = false\nretention_age = 14d\n",
    )
    .unwrap();
    let (_, err) = expect(&["config", "check", bad.to_str().unwrap()], 2);
    assert!(err.contains("line 3, column "), "{err}");
    // An unknown key, by name and line.
    std::fs::write(&bad, "name = \"gpu-01\"\n\nbootstrapp = []\n").unwrap();
    let (_, err) = expect(&["config", "check", bad.to_str().unwrap()], 2);
    assert!(
        err.contains("line 3") && err.contains("bootstrapp"),
        "{err}"
    );
    // A value the agent refuses, with its key.
    std::fs::write(&bad, "voters = [\"a\", \"a\"]\n").unwrap();
    let (_, err) = expect(&["config", "check", bad.to_str().unwrap()], 2);
    assert!(err.contains("voters") && err.contains("twice"), "{err}");
    // The default config warns that the host is alone.
    let (out, _) = expect(
        &[
            "config",
            "check",
            "--data-dir",
            dir.path().join("d").to_str().unwrap(),
            "--no-mdns",
        ],
        0,
    );
    assert!(
        out.contains("warning") && out.contains("bootstrap"),
        "{out}"
    );
}

/// A port where nothing listens (bound, then closed).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_tell_the_classes_apart_and_lock_commands_read_well() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("swarm.key");
    keygen(&key);
    let cfg = dir.path().join("solo.toml");
    std::fs::write(&cfg, "voters = [\"solo\"]\n").unwrap();
    let a = Agent::start_with(
        dir.path(),
        "solo",
        &key,
        &[],
        &["--config".into(), cfg.display().to_string()],
    )
    .await;
    wait_for("solo to lead", LONG, || async {
        let v = a.get("/v1/leader").await.ok()?;
        (v["is_self"] == true).then_some(())
    })
    .await;
    let api = a.api.trim_start_matches("http://").to_string();
    let api = api.as_str();

    // 2: usage.
    expect(&["nosuchverb"], 2);
    expect(&["lock", "acquire", "x", "--ttl", "soon", "--api", api], 2);
    expect(&["report", "gpu_util", "--api", api], 2);
    expect(&["publish", "X", "--payload", "{", "--api", api], 2);
    let o = Command::new(BIN)
        .arg("status")
        .env("RIFTMESH_API", "localhost")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("names no port") && text(&o.stderr).contains("localhost:7411"),
        "{}",
        text(&o.stderr)
    );

    // 4: no agent there; or the metrics port, named as such.
    let closed = format!("127.0.0.1:{}", closed_port());
    let (_, err) = expect(&["status", "--api", &closed], 4);
    assert!(err.contains("cannot reach"), "{err}");
    let metrics = a
        .metrics
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string();
    let (_, err) = expect(&["members", "--api", &metrics], 4);
    assert!(err.contains("metrics port"), "{err}");

    // 5: not found.
    expect(&["trace", "no-such-event", "--api", api], 5);
    let (_, err) = expect(&["lock", "release", "nolock", "--api", api], 5);
    assert!(err.contains("not held"), "{err}");

    // 6: conflict: a lock held; a file that exists.
    let (tok, _) = expect(&["lock", "acquire", "job", "--api", api], 0);
    let tok: u64 = tok.trim().parse().unwrap();
    let (_, err) = expect(&["lock", "acquire", "job", "--api", api], 6);
    assert!(err.contains("held by solo"), "{err}");
    expect(&["keygen", "--out", key.to_str().unwrap()], 6);

    // 7: refused by policy (the API refuses a Host that is not its own:
    // an IPv4-mapped address reaches the listener under another name).
    let port = api.rsplit_once(':').unwrap().1;
    let mapped = format!("http://[::ffff:127.0.0.1]:{port}");
    let (_, err) = expect(&["status", "--api", &mapped], 7);
    assert!(err.contains("403"), "{err}");

    // 1: anything else (a file that cannot be written).
    expect(
        &[
            "keygen",
            "--out",
            dir.path().join("no/such/dir/key").to_str().unwrap(),
        ],
        1,
    );

    // lock list: names, holders, tokens and human times.
    let (out, _) = expect(&["lock", "list", "--api", api], 0);
    assert!(out.starts_with("NAME"), "{out}");
    let row = out.lines().find(|l| l.starts_with("job ")).expect(&out);
    assert!(
        row.contains(" solo ") && row.contains(&format!(" {tok} ")),
        "{row}"
    );
    assert!(row.contains("Z ") && row.contains(" in "), "{row}");
    assert!(!out.contains("expires_ms"), "{out}");

    // lock release without --token: only a lock this agent holds.
    let (other, _) = expect(
        &[
            "lock", "acquire", "theirs", "--holder", "gpu-99", "--api", api,
        ],
        0,
    );
    let (_, err) = expect(&["lock", "release", "theirs", "--api", api], 6);
    assert!(err.contains("gpu-99") && err.contains("--token"), "{err}");
    expect(&["lock", "release", "job", "--api", api], 0);
    let (out, _) = expect(&["lock", "list", "--api", api], 0);
    assert!(!out.contains("job "), "{out}");
    assert!(out.contains("theirs "), "{out}");
    expect(
        &[
            "lock",
            "release",
            "theirs",
            "--token",
            other.trim(),
            "--api",
            api,
        ],
        0,
    );

    // members: version and address columns.
    let (out, _) = expect(&["members", "--api", api], 0);
    let header = out.lines().next().unwrap();
    assert!(
        header.contains("VERSION") && header.contains("ADDRESS"),
        "{header}"
    );
    let row = out.lines().find(|l| l.starts_with("solo ")).expect(&out);
    assert!(
        row.contains(env!("CARGO_PKG_VERSION")) && row.contains("127.0.0.1:"),
        "{row}"
    );
}
