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
        .env_remove("RIFTMESH_API_TOKEN_FILE")
        .env_remove("RIFTMESH_DATA_DIR")
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
    // man justifies lines by widening spaces: compare with single spaces.
    let flat = shown.split_whitespace().collect::<Vec<_>>().join(" ");
    for want in ["NAME", "SYNOPSIS", "completion", "config", "Exit status"] {
        assert!(
            flat.contains(want),
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
    // The API token: none on loopback; elsewhere the file the agent will
    // make; a named file the agent would refuse is refused here too.
    let d = dir.path().join("d");
    let d = d.to_str().unwrap();
    let check = |extra: &[&str], code: i32| {
        let mut args = vec!["config", "check", "--data-dir", d, "--no-mdns", "--json"];
        args.extend_from_slice(extra);
        expect(&args, code)
    };
    let (out, _) = check(&[], 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["api_token_file"].as_str().unwrap().starts_with("none"),
        "{v}"
    );
    let (out, _) = check(&["--api", "0.0.0.0:7411"], 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["api_token_file"],
        format!("{d}/api.token (made at the first start)"),
        "{v}"
    );
    let tf = dir.path().join("api-token");
    std::fs::write(&tf, "short\n").unwrap();
    std::fs::set_permissions(&tf, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (_, err) = check(&["--api-token-file", tf.to_str().unwrap()], 2);
    assert!(
        err.contains("API token file") && err.contains("16"),
        "{err}"
    );
    std::fs::write(&tf, "a-token-of-twenty-characters\n").unwrap();
    let (out, _) = check(&["--api-token-file", tf.to_str().unwrap()], 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["api_token_file"], tf.to_str().unwrap(), "{v}");
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

#[test]
fn keygen_json_says_what_was_written_and_never_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("swarm.key");
    let p = path.to_str().unwrap();
    let (out, _) = expect(&["keygen", "--out", p, "--json"], 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(v["path"], p, "{v}");
    assert_eq!(v["written"], true, "{v}");
    assert_eq!(v["replaced"], false, "{v}");
    assert!(
        v["fingerprint"].as_str().is_some_and(|f| f.len() == 32),
        "{v}"
    );
    // The key (its hex line) is in the file, not on stdout.
    let key = std::fs::read_to_string(&path).unwrap();
    let secret = key.lines().last().unwrap();
    assert_eq!(secret.len(), 64, "{key}");
    assert!(!out.contains(secret), "{out}");
    // Overwriting says so; without --out there is nothing to describe.
    let (out, _) = expect(&["keygen", "--out", p, "--force", "--json"], 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(v["replaced"], true, "{v}");
    let (out, err) = expect(&["keygen", "--json"], 2);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("--out"), "{err}");
    // Without --json: the key on stdout, as before.
    let (out, _) = expect(&["keygen"], 0);
    assert!(out.starts_with("/key/swarm/psk/1.0.0/"), "{out}");
}

/// A CLI process left running, its stdout and stderr read as they come.
struct Running {
    child: std::process::Child,
    out: std::sync::Arc<std::sync::Mutex<String>>,
    err: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Running {
    fn start(args: &[&str]) -> Running {
        let mut child = Command::new(BIN)
            .args(args)
            .env_remove("RIFTMESH_API")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pump = |mut r: Box<dyn std::io::Read + Send>| {
            let buf = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
            let b = buf.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = r.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    b.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            });
            buf
        };
        let out = pump(Box::new(child.stdout.take().unwrap()));
        let err = pump(Box::new(child.stderr.take().unwrap()));
        Running { child, out, err }
    }

    fn out(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn err(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Wait for the process to end; its exit status.
    async fn exit(&mut self, what: &str) -> std::process::ExitStatus {
        let child = &mut self.child;
        wait_for(what, LONG, || {
            let r = child.try_wait().unwrap();
            async move { r }
        })
        .await
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last 8 characters of a peer id, as the CLI shows them.
fn tail8(id: &str) -> String {
    id[id.len() - 8..].to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_read_names_waits_and_flat_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("swarm.key");
    keygen(&key);
    let cfg = dir.path().join("a.toml");
    std::fs::write(&cfg, "voters = [\"a\"]\n").unwrap();
    // a logs JSON; b text (both to a file: no terminal).
    let a = Agent::start_with(
        dir.path(),
        "a",
        &key,
        &[],
        &[
            "--config".into(),
            cfg.display().to_string(),
            "--log-format".into(),
            "json".into(),
        ],
    )
    .await;
    let boot = vec![a.p2p_addr().await];
    let cfg_b = dir.path().join("b.toml");
    std::fs::write(&cfg_b, "voters = [\"a\"]\n").unwrap();
    let b = Agent::start_with(
        dir.path(),
        "b",
        &key,
        &boot,
        &["--config".into(), cfg_b.display().to_string()],
    )
    .await;
    wait_for("a to lead, known to b", LONG, || async {
        let v = b.get("/v1/leader").await.ok()?;
        (v["leader"] == "a").then_some(())
    })
    .await;
    wait_for("each to know the other's name", LONG, || async {
        a.member("b").await?;
        b.member("a").await?;
        Some(())
    })
    .await;
    let (api_a, api_b) = (a.api.as_str(), b.api.as_str());
    let (ta, tb) = (tail8(&a.peer_id), tail8(&b.peer_id));

    // peers: the name beside the id.
    let (out, _) = expect(&["peers", "--api", api_a], 0);
    assert!(out.contains(&format!("b (…{tb})")), "{out}");
    assert!(out.contains(&b.peer_id), "{out}");
    // --json unchanged: ids only.
    let (out, _) = expect(&["peers", "--api", api_a, "--json"], 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["peers"][0]["peer_id"], b.peer_id.as_str(), "{v}");
    // members: a PEER column.
    let (out, _) = expect(&["members", "--api", api_a], 0);
    assert!(out.lines().next().unwrap().contains("PEER"), "{out}");
    let row = out.lines().find(|l| l.starts_with("b ")).expect(&out);
    assert!(row.contains(&format!("…{tb}")), "{row}");
    // leader: the name with the id.
    let (out, _) = expect(&["leader", "--api", api_b], 0);
    assert!(out.contains(&format!("(a …{ta})")), "{out}");

    // events, piped: no header line, one line per event, nodes by name.
    a.publish("TRAINING_COMPLETED", serde_json::json!({ "n": 1 }))
        .await
        .unwrap();
    wait_for("b to have a's event", LONG, || async {
        let v = b.get("/v1/events?types=TRAINING_COMPLETED").await.ok()?;
        (!v["events"].as_array()?.is_empty()).then_some(())
    })
    .await;
    let (out, _) = expect(
        &["events", "--type", "TRAINING_COMPLETED", "--api", api_b],
        0,
    );
    assert_eq!(out.lines().count(), 1, "a header on a pipe:\n{out}");
    assert!(!out.contains("SEQ"), "{out}");
    assert!(
        out.contains(&format!(" a (…{ta})")) && out.contains("TRAINING_COMPLETED"),
        "{out}"
    );

    // lock list: a holder that is a member's name shows its id too.
    let (tok, _) = expect(&["lock", "acquire", "job", "--api", api_a], 0);
    let (out, _) = expect(&["lock", "list", "--api", api_a], 0);
    let row = out.lines().find(|l| l.starts_with("job ")).expect(&out);
    assert!(row.contains(&format!(" a (…{ta}) ")), "{row}");
    expect(
        &[
            "lock",
            "release",
            "job",
            "--token",
            tok.trim(),
            "--api",
            api_a,
        ],
        0,
    );

    // lock acquire --wait says what it waits for, once (then every 30 s).
    let (other, _) = expect(
        &[
            "lock", "acquire", "job", "--holder", "gpu-99", "--ttl", "60s", "--api", api_a,
        ],
        0,
    );
    let mut waiting = Running::start(&["lock", "acquire", "job", "--wait", "--api", api_a]);
    wait_for("lock acquire --wait to say what it waits for", LONG, || {
        let err = waiting.err();
        async move { err.contains("waiting for lock job").then_some(()) }
    })
    .await;
    let err = waiting.err();
    assert!(
        err.contains("waiting for lock job (held by gpu-99 (token ") && err.contains(" for 0s"),
        "{err}"
    );
    expect(
        &[
            "lock",
            "release",
            "job",
            "--token",
            other.trim(),
            "--api",
            api_a,
        ],
        0,
    );
    let st = waiting.exit("lock acquire --wait to get the lock").await;
    assert!(st.success(), "{st:?}: {}", waiting.err());
    assert!(
        waiting.out().trim().parse::<u64>().is_ok(),
        "{}",
        waiting.out()
    );
    assert_eq!(
        waiting.err().matches("waiting for lock").count(),
        1,
        "{}",
        waiting.err()
    );

    // run --if-leader on a follower says what it waits for; SIGTERM ends it.
    let mut follower = Running::start(&["run", "--if-leader", "--api", api_b, "--", "true"]);
    wait_for("run --if-leader to say what it waits for", LONG, || {
        let err = follower.err();
        async move { err.contains("waiting to become leader").then_some(()) }
    })
    .await;
    let err = follower.err();
    assert!(
        err.contains("waiting to become leader (leader is a, term ")
            && err.contains("this agent is not a voter) for 0s"),
        "{err}"
    );
    follower.signal("TERM");
    let st = follower.exit("run --if-leader to stop").await;
    assert_eq!(st.code(), Some(143), "{st:?}");

    // sync status --watch on a pipe: a new table each refresh, until
    // SIGINT or SIGTERM (exit 0).
    for sig in ["INT", "TERM"] {
        let mut watch = Running::start(&[
            "sync",
            "status",
            "--watch",
            "--interval",
            "200ms",
            "--api",
            api_a,
        ]);
        wait_for("two tables", LONG, || {
            let out = watch.out();
            async move {
                (out.lines().filter(|l| l.starts_with("store ")).count() >= 2).then_some(())
            }
        })
        .await;
        let out = watch.out();
        assert!(out.starts_with("--- sync status at "), "{out}");
        assert!(!out.contains('\x1b'), "no redrawing on a pipe: {out:?}");
        watch.signal(sig);
        let st = watch.exit("sync status --watch to stop").await;
        assert_eq!(st.code(), Some(0), "SIG{sig}: {st:?} {}", watch.err());
    }
    expect(
        &[
            "sync",
            "status",
            "--watch",
            "--interval",
            "0s",
            "--api",
            api_a,
        ],
        2,
    );

    // JSON log lines: every line an object, fields at the top level,
    // lists as arrays.
    let log = std::fs::read_to_string(a.dir.join("agent.log")).unwrap();
    let mut started = None;
    for l in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.is_object(), "{l}");
        assert!(v.get("fields").is_none(), "nested fields: {l}");
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
        if v["message"] == "riftmesh agent started" {
            started = Some(v);
        }
    }
    let started = started.expect(&log);
    assert_eq!(started["name"], "a", "{started}");
    assert_eq!(started["peer_id"], a.peer_id.as_str(), "{started}");
    assert_eq!(
        started["listen"],
        serde_json::json!(["/ip4/127.0.0.1/tcp/0"]),
        "{started}"
    );
    assert_eq!(started["bootstrap"], serde_json::json!([]), "{started}");
    // Text logs into a file: no colour codes.
    let log = std::fs::read(b.dir.join("agent.log")).unwrap();
    assert!(!log.is_empty());
    assert!(!log.contains(&0x1b), "ANSI codes in a log file");
}
