//! The local API's trust boundary with a real agent (proto-notes/security.md):
//! files named by a request are read only under `blob_roots`, never the
//! agent's own keys, `/proc` or a FIFO; blobs otherwise come as uploaded
//! bytes; a foreign `Host` is refused; fault injection is off by default;
//! an API that is not on loopback (or has `api_token_file`) answers only
//! requests with its token.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{keygen, Agent, BIN};
use serde_json::{json, Value};

/// POST a JSON body with a short client timeout; (status, body).
async fn post_quick(a: &Agent, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", a.api))
        .timeout(Duration::from_secs(5))
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path} {body}: no answer within 5 s: {e}"));
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_named_by_a_request_are_read_only_under_blob_roots() {
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("swarm.key");
    keygen(&key);
    // The root holds the agent's data dir (t/a) and the swarm key, so the
    // refusals below come from the never-list, not from being outside.
    let root = t.path().join("models");
    std::fs::create_dir_all(&root).unwrap();
    let outside = tempfile::tempdir().unwrap();
    let mut a = Agent::start_with(
        t.path(),
        "a",
        &key,
        &[],
        &["--blob-root".into(), t.path().display().to_string()],
    )
    .await;
    let data = a.dir.clone();
    std::fs::write(root.join("m.bin"), b"model bytes").unwrap();
    std::fs::write(outside.path().join("outside.bin"), b"outside").unwrap();
    std::os::unix::fs::symlink(data.join("identity.key"), root.join("id-link")).unwrap();
    mkfifo(&root.join("fifo"));
    let dotdot = t
        .path()
        .join("..")
        .join(outside.path().file_name().unwrap())
        .join("outside.bin");

    // Under the root: read.
    let (s, v) = post_quick(
        &a,
        "/v1/blobs",
        &json!({"path": root.join("m.bin"), "name": "models/m"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");

    // The agent's secrets, /proc, a symlink out of the root, `..`: refused.
    let refused = [
        data.join("identity.key"),
        data.join("agent.json"),
        key.clone(),
        "/proc/self/environ".into(),
        root.join("id-link"),
        dotdot,
        outside.path().join("outside.bin"),
    ];
    for p in &refused {
        let (s, v) = post_quick(&a, "/v1/blobs", &json!({"path": p, "name": "x/k"})).await;
        assert_eq!(s, 403, "{} answered {s} {v}", p.display());
        assert!(v["error"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    // Nothing was announced under the refused name.
    let names = a.get("/v1/blobs").await.unwrap();
    assert!(!names.to_string().contains("x/k"), "{names}");

    // A FIFO: refused at once, five times; the agent still stops on SIGTERM.
    for _ in 0..5 {
        let started = Instant::now();
        let (s, v) = post_quick(
            &a,
            "/v1/blobs",
            &json!({"path": root.join("fifo"), "name": "x/f"}),
        )
        .await;
        assert_eq!(s, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains("FIFO"), "{v}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    a.signal("TERM");
    let st = a.wait_exit(Duration::from_secs(20)).await;
    assert!(st.success(), "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_roots_no_path_is_read_and_uploads_work() {
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("swarm.key");
    keygen(&key);
    let a = Agent::start(t.path(), "a", &key, &[]).await;
    let f = t.path().join("model.bin");
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&f, &bytes).unwrap();

    let (s, v) = post_quick(&a, "/v1/blobs", &json!({"path": f, "name": "models/m"})).await;
    assert_eq!(s, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("upload"), "{v}");

    // The CLI sends the bytes; the content comes back byte for byte.
    let out = Command::new(BIN)
        .args(["blob", "add"])
        .arg(&f)
        .args([
            "--name",
            "models/m",
            "--api",
            a.api.trim_start_matches("http://"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let got = reqwest::get(format!("{}/v1/blob/content?ref=models/m", a.api))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got[..] == bytes[..], "content differs");

    // An upload whose body ends before its Content-Length stores nothing:
    // 10 bytes of 100, then the sender half-closes.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(a.api.trim_start_matches("http://"))
            .await
            .unwrap();
        c.write_all(
            b"POST /v1/blobs/upload?name=models/short HTTP/1.1\r\nHost: 127.0.0.1\r\n\
              Content-Length: 100\r\n\r\n0123456789",
        )
        .await
        .unwrap();
        c.shutdown().await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer))
            .await
            .expect("the agent answers or closes a short upload within 10 s");
        let answer = String::from_utf8_lossy(&answer);
        assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let names = a.get("/v1/blobs").await.unwrap();
    assert!(!names.to_string().contains("models/short"), "{names}");
    // Without a length: 411.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/blobs/upload?name=models/x", a.api))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(vec![
            Ok::<_, std::io::Error>(vec![1u8; 10]),
        ])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 411);
    // What a web page can send without a preflight (text/plain), or
    // anything carrying a browser's Origin: refused, nothing named.
    let upload = |ct: &'static str, origin: Option<&'static str>| {
        let mut r = reqwest::Client::new()
            .post(format!(
                "{}/v1/blobs/upload?name=models/evil&event=MODEL_PROMOTED",
                a.api
            ))
            .header("content-type", ct)
            .body(vec![7u8; 100]);
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(upload("text/plain", None).await, 415);
    assert_eq!(
        upload("application/octet-stream", Some("https://evil.example")).await,
        403
    );
    let left = reqwest::Client::new()
        .post(format!("{}/v1/leave", a.api))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(left, 403, "a web page cannot stop the agent");
    // A length no blob can have: refused before anything is read.
    let huge = reqwest::Client::new()
        .post(format!("{}/v1/blobs/upload?name=models/huge", a.api))
        .header("content-type", "application/octet-stream")
        .header("content-length", u64::MAX.to_string())
        .body(Vec::<u8>::new())
        .send()
        .await;
    if let Ok(r) = huge {
        assert!(r.status().is_client_error(), "{}", r.status());
    }
    let names = a.get("/v1/blobs").await.unwrap();
    assert!(!names.to_string().contains("models/evil"), "{names}");
    assert!(a.get("/v1/health").await.is_ok(), "the agent is still up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_host_is_refused_and_fault_injection_is_off_by_default() {
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("swarm.key");
    keygen(&key);
    let a = Agent::start(t.path(), "a", &key, &[]).await;
    let port = a.api.rsplit(':').next().unwrap().to_string();
    let with_host = |h: String, post: bool| {
        let c = reqwest::Client::new();
        let url = format!("{}/v1/events", a.api);
        let r = if post {
            c.post(url)
                .json(&json!({"type": "X_HOSTCHECK", "payload": {}}))
        } else {
            c.get(url)
        };
        async move { r.header("host", h).send().await.unwrap().status().as_u16() }
    };
    for h in [
        "attacker.example",
        "attacker.example:80",
        "127.0.0.1.nip.io",
    ] {
        assert_eq!(
            with_host(format!("{h}:{port}"), false).await,
            403,
            "GET {h}"
        );
        assert_eq!(
            with_host(format!("{h}:{port}"), true).await,
            403,
            "POST {h}"
        );
    }
    for h in ["localhost", "127.0.0.1", "[::1]"] {
        assert_eq!(with_host(format!("{h}:{port}"), false).await, 200, "{h}");
    }
    // Nothing a refused POST carried reached the log.
    let v = a.get("/v1/events?types=X_HOSTCHECK").await.unwrap();
    assert_eq!(v["events"].as_array().unwrap().len(), 0, "{v}");
    // A refusal is counted like any other API error.
    assert!(a.metric("riftmesh_api_errors_total{code=\"403\"}").await >= 6.0);

    // Off by default: the call is refused and blocks nothing.
    let (s, v) = post_quick(&a, "/v1/debug/block", &json!({"peers": []})).await;
    assert_eq!(s, 403, "{v}");
    // Page sizes of 0 are refused, as api.md says.
    let e = a.get("/v1/events?limit=0").await.unwrap_err();
    assert!(e.starts_with("400"), "{e}");
    let e = a.get("/v1/consumers/c1/events?max=0").await.unwrap_err();
    assert!(e.starts_with("400"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_is_accepted_only_when_switched_on() {
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("swarm.key");
    keygen(&key);
    let a = Agent::start_with(t.path(), "a", &key, &[], &["--fault-injection".into()]).await;
    let (s, v) = post_quick(&a, "/v1/debug/block", &json!({"peers": []})).await;
    assert_eq!(s, 200, "{v}");
}

/// A request without the token (or with `auth` as its Authorization
/// value): (status, WWW-Authenticate, body).
async fn no_token(
    a: &Agent,
    method: reqwest::Method,
    path: &str,
    auth: Option<&str>,
) -> (u16, Option<String>, Value) {
    let mut r = reqwest::Client::new()
        .request(method, format!("{}{path}", a.api))
        .timeout(Duration::from_secs(5));
    if path != "/v1/health" {
        r = r.json(&json!({"type": "X_NOTOKEN", "payload": {}, "peers": [], "name": "n"}));
    }
    if let Some(v) = auth {
        r = r.header("authorization", v);
    }
    let resp = r.send().await.unwrap();
    let s = resp.status().as_u16();
    let www = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    (s, www, resp.json().await.unwrap_or(Value::Null))
}

/// Run a command that must exit by itself within 30 s; its status and stderr.
async fn exits(cmd: &mut Command) -> (std::process::ExitStatus, String) {
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after 30 s: it was to refuse to start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (st, err)
}

/// The CLI's `status` against `a`, from a directory without a data dir;
/// (exit code, stderr).
fn cli_status(a: &Agent, args: &[&str], env: &[(&str, &Path)]) -> (Option<i32>, String) {
    let cwd = tempfile::tempdir().unwrap();
    let mut c = Command::new(BIN);
    c.current_dir(cwd.path())
        .args(["status", "--api", a.api.trim_start_matches("http://")])
        .args(args)
        .env_remove("RIFTMESH_API_TOKEN_FILE")
        .env_remove("RIFTMESH_DATA_DIR")
        .env_remove("RIFTMESH_API");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_api_answers_only_with_its_token_fault_injection_included() {
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("swarm.key");
    keygen(&key);
    // Bound to every address (not loopback), fault injection on: the agent
    // makes its token and starts.
    let open_all = [
        "--api".to_string(),
        "0.0.0.0:0".into(),
        "--fault-injection".into(),
    ];
    let a = Agent::start_with(t.path(), "a", &key, &[], &open_all).await;
    let token_file = a.dir.join("api.token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert!(
        token.trim().len() == 64 && token.trim().bytes().all(|b| b.is_ascii_hexdigit()),
        "{token:?}"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let b = Agent::start_with(t.path(), "b", &key, &[a.p2p_addr().await], &open_all).await;
    assert_ne!(a.token, b.token, "each agent makes its own token");
    common::wait_for("a and b connected", Duration::from_secs(60), || async {
        (a.connected_peers().await >= 1).then_some(())
    })
    .await;
    let errors_before = a
        .metric_or_zero("riftmesh_api_errors_total{code=\"401\"}")
        .await;

    // Without the token, or with another, or malformed: 401 before any
    // handler (an unknown path too), with a JSON message and the scheme.
    use reqwest::Method;
    let block = "/v1/debug/block";
    let mut refused = 0.0;
    for (method, path, auth, says) in [
        (Method::GET, "/v1/status", None, "needs a token"),
        (Method::POST, "/v1/events", None, "needs a token"),
        (Method::GET, "/v1/no-such-endpoint", None, "needs a token"),
        (Method::POST, block, None, "needs a token"),
        (
            Method::POST,
            block,
            Some("Bearer 0123456789abcdef0123"),
            "wrong API token",
        ),
        (Method::POST, block, Some("Basic YTpi"), "Bearer <token>"),
        (
            Method::GET,
            "/v1/health",
            Some("Bearer not-the-token-at-all"),
            "wrong API token",
        ),
    ] {
        let (s, www, v) = no_token(&a, method.clone(), path, auth).await;
        assert_eq!(s, 401, "{method} {path} {auth:?}: {v}");
        assert_eq!(www.as_deref(), Some("Bearer realm=\"riftmesh\""), "{path}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{method} {path} {auth:?}: {v}");
        assert!(!msg.contains(token.trim()), "the token leaked: {v}");
        refused += 1.0;
    }
    // The token itself with the wrong scheme is refused too.
    let (s, _, _) = no_token(
        &a,
        Method::POST,
        block,
        Some(&format!("Token {}", token.trim())),
    )
    .await;
    assert_eq!(s, 401);
    refused += 1.0;
    // Nothing a refused request carried got through: no event, no block.
    let v = a.get("/v1/events?types=X_NOTOKEN").await.unwrap();
    assert_eq!(v["events"].as_array().unwrap().len(), 0, "{v}");
    let (s, _, v) = no_token(&a, Method::POST, block, None).await;
    assert_eq!(s, 401, "{v}");
    refused += 1.0;
    let r = reqwest::Client::new()
        .post(format!("{}{block}", a.api))
        .json(&json!({"peers": [b.peer_id]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    refused += 1.0;
    assert!(a.member("b").await.is_some_and(|m| m["connected"] == true));

    // The health probe stays open without the header, and says only ok.
    let (s, _, v) = no_token(&a, Method::GET, "/v1/health", None).await;
    assert_eq!((s, v), (200, json!({"ok": true})));

    // Counted like any API error; logged once for this address.
    let errors = a.metric("riftmesh_api_errors_total{code=\"401\"}").await;
    assert!(
        errors - errors_before >= refused,
        "{errors} - {errors_before} < {refused}"
    );
    let lines = common::log_lines(&a, &["API request refused", "127.0.0.1"]);
    assert_eq!(lines.len(), 1, "{lines:#?}");

    // With the token: fault injection answers and cuts b off.
    let r = a
        .request(Method::POST, block)
        .json(&json!({"peers": [b.peer_id]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    common::wait_for("a to drop b", Duration::from_secs(30), || async {
        (a.connected_peers().await == 0).then_some(())
    })
    .await;

    // The CLI: refused without a token (exit 7), and sends the token from
    // --api-token-file, RIFTMESH_API_TOKEN_FILE, or the agent's own data
    // directory; a data directory's token never goes to another agent.
    let (code, err) = cli_status(&a, &[], &[]);
    assert_eq!(code, Some(7), "{err}");
    assert!(
        err.contains("401") && err.contains("needs a token"),
        "{err}"
    );
    let tf = token_file.to_str().unwrap();
    assert_eq!(cli_status(&a, &["--api-token-file", tf], &[]).0, Some(0));
    assert_eq!(
        cli_status(&a, &[], &[("RIFTMESH_API_TOKEN_FILE", &token_file)]).0,
        Some(0)
    );
    let dir = a.dir.to_str().unwrap();
    assert_eq!(cli_status(&a, &["--data-dir", dir], &[]).0, Some(0));
    assert_eq!(
        cli_status(&a, &[], &[("RIFTMESH_DATA_DIR", &a.dir)]).0,
        Some(0)
    );
    let (code, err) = cli_status(&b, &["--data-dir", dir], &[]);
    assert_eq!(code, Some(7), "{err}");
    assert!(
        err.contains("needs a token"),
        "a's token was sent to b: {err}"
    );
    let (code, err) = cli_status(&a, &["--api-token-file", "/nonexistent/api.token"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("/nonexistent/api.token"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_token_file_must_be_usable_and_is_required_on_loopback_too() {
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("swarm.key");
    keygen(&key);
    let file = t.path().join("token");
    let start = |file: &Path, api: &str| {
        let mut c = Command::new(BIN);
        c.arg("agent")
            .args(["--name", "bad", "--data-dir"])
            .arg(t.path().join("bad"))
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--api", api])
            .args(["--metrics", "127.0.0.1:0", "--no-mdns", "--swarm-key"])
            .arg(&key)
            .arg("--api-token-file")
            .arg(file)
            .env_remove("RIFTMESH_API_TOKEN_FILE");
        c
    };
    let set_mode = |mode: u32| {
        let mut p = std::fs::metadata(&file).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut p, mode);
        std::fs::set_permissions(&file, p).unwrap();
    };
    let good = "a-token-the-operator-chose-0123456789";
    // Missing, empty, too short, two words, writable by others: the agent
    // refuses to start and says why, whatever the API's address.
    for (text, mode, says) in [
        (None, 0o600, "No such file"),
        (Some("\n"), 0o600, "empty"),
        (Some("short\n"), 0o600, "16"),
        (Some("two words-0123456789\n"), 0o600, "one line"),
        (Some(good), 0o666, "writable by group or others"),
        (Some(good), 0o620, "writable by group or others"),
    ] {
        let _ = std::fs::remove_file(&file);
        if let Some(text) = text {
            std::fs::write(&file, text).unwrap();
            set_mode(mode);
        }
        for api in ["127.0.0.1:0", "0.0.0.0:0"] {
            let (st, err) = exits(&mut start(&file, api)).await;
            assert!(!st.success(), "{text:?} {mode:o} {api}: started");
            assert!(
                err.contains("API token file") && err.contains(says),
                "{text:?} {mode:o}: {err}"
            );
        }
    }
    // A good file (group-readable is the operator's choice): required on
    // loopback too, because it is configured. The store is made read-only
    // (more free space asked than any disk has) so that health has details
    // to keep from a caller without the token.
    std::fs::write(&file, format!("{good}\n")).unwrap();
    set_mode(0o640);
    let cfg = t.path().join("a.toml");
    std::fs::write(&cfg, "store_min_free = \"1000TiB\"\n").unwrap();
    let a = Agent::start_with(
        t.path(),
        "a",
        &key,
        &[],
        &[
            "--api-token-file".into(),
            file.display().to_string(),
            "--config".into(),
            cfg.display().to_string(),
        ],
    )
    .await;
    assert!(a.api.starts_with("http://127.0.0.1:"), "{}", a.api);
    assert_eq!(a.token.as_deref(), Some(good));
    let (s, _, v) = no_token(&a, reqwest::Method::GET, "/v1/status", None).await;
    assert_eq!(s, 401, "{v}");
    assert!(a.get("/v1/status").await.is_ok(), "with the token");
    assert!(
        !a.dir.join("api.token").exists(),
        "a configured file is not copied"
    );
    // Health: without the header only up or not; with the token, why.
    let (s, _, v) = no_token(&a, reqwest::Method::GET, "/v1/health", None).await;
    assert_eq!((s, v), (200, json!({"ok": false})));
    let v = a.get("/v1/health").await.unwrap();
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("store_min_free")),
        "{v}"
    );
}

fn chunked_config(root: &Path, name: &str, body: &str) -> Vec<String> {
    let p = root.join(format!("{name}.toml"));
    std::fs::write(&p, format!("blob_chunk_size = \"256KiB\"\n{body}")).unwrap();
    vec!["--config".into(), p.display().to_string()]
}

/// What `GET /v1/blob/content` gave: `Some(bytes)` for a whole 200 answer,
/// `None` for a refusal or a body cut short.
async fn content(a: &Agent, r: &str) -> Option<Vec<u8>> {
    let resp = reqwest::get(format!("{}/v1/blob/content?ref={r}", a.api))
        .await
        .ok()?;
    if resp.status() != 200 {
        // 503: found damaged now; 404: demoted and being fetched again.
        assert!(
            [503, 404].contains(&resp.status().as_u16()),
            "{}",
            resp.status()
        );
        return None;
    }
    resp.bytes().await.ok().map(|b| b.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_local_copy_is_never_served_and_is_repaired_from_a_peer() {
    use sha2::{Digest, Sha256};
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let key = root.join("swarm.key");
    keygen(&key);
    let a = Agent::start_with(root, "a", &key, &[], &chunked_config(root, "a", "")).await;
    let boot = a.p2p_addr().await;
    let placed_dir = root.join("placed");
    let want = format!(
        "[[want]]\nnames = \"models/*\"\nplace = \"{}/{{name}}.bin\"\n",
        placed_dir.display()
    );
    let mut b =
        Agent::start_with(root, "b", &key, &[boot], &chunked_config(root, "b", &want)).await;
    common::wait_for("a and b connected", Duration::from_secs(60), || async {
        (b.connected_peers().await >= 1).then_some(())
    })
    .await;

    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let id = hex::encode(Sha256::digest(&data));
    let src = root.join("m.bin");
    std::fs::write(&src, &data).unwrap();
    let out = Command::new(BIN)
        .args(["blob", "add"])
        .arg(&src)
        .args(["--name", "models/m", "--event", "MODEL_PROMOTED"])
        .args(["--api", a.api.trim_start_matches("http://")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let placed = placed_dir.join("m.bin");
    common::wait_for("b placed the model", Duration::from_secs(60), || async {
        (std::fs::read(&placed).ok()? == data).then_some(())
    })
    .await;

    type Damage = fn(&mut Vec<u8>);
    let flip: Damage = |b| b[1_500_000..1_500_004].iter_mut().for_each(|x| *x ^= 0x5a);
    let truncate: Damage = |b| b.truncate(1_000_000);
    let damages = [
        ("four flipped bytes", flip),
        ("a truncation to 1 MB", truncate),
    ];
    let obj = b.dir.join("blobs/objects").join(&id);
    for (what, damage) in damages {
        // Damage b's copy while it is down, as disk rot would.
        b.kill9();
        let mut bytes = std::fs::read(&obj).unwrap();
        damage(&mut bytes);
        let mut perm = std::fs::metadata(&obj).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
        std::fs::set_permissions(&obj, perm).unwrap();
        std::fs::write(&obj, &bytes).unwrap();
        b.spawn().await;
        let before = b
            .metric_or_zero("riftmesh_sync_chunks_rejected_total{reason=\"local_damage\"}")
            .await;

        // The API never gives other bytes than the blob's.
        if let Some(got) = content(&b, "models/m").await {
            assert!(got == data, "{what}: damaged bytes served");
        }
        // Nor does the CLI write them.
        let cli_out = root.join(format!("get-{}.bin", what.len()));
        let st = Command::new(BIN)
            .args(["blob", "get", "models/m", "--out"])
            .arg(&cli_out)
            .args(["--api", b.api.trim_start_matches("http://")])
            .output()
            .unwrap();
        if st.status.success() {
            assert!(
                std::fs::read(&cli_out).unwrap() == data,
                "{what}: CLI wrote damage"
            );
        } else {
            assert!(!cli_out.exists(), "{what}: a failed get left a file");
        }
        // Repaired from a, and counted.
        common::wait_for(
            &format!("{what}: b's copy repaired"),
            Duration::from_secs(60),
            || async { (content(&b, &id).await? == data).then_some(()) },
        )
        .await;
        assert!(
            std::fs::read(&obj).unwrap() == data,
            "{what}: object not repaired"
        );
        let after = b
            .metric("riftmesh_sync_chunks_rejected_total{reason=\"local_damage\"}")
            .await;
        assert!(
            after >= 1.0 && after >= before,
            "{what}: damage not counted ({after})"
        );
        assert!(std::fs::read(&placed).unwrap() == data);
    }
}
