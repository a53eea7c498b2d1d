//! Separate `tern` processes: node daemons on loopback and CLI invocations, every one of them
//! killed and reaped when its guard drops, every wait bounded.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a node may take to print its address, and a CLI call that should be quick.
pub const QUICK: Duration = Duration::from_secs(30);

/// The `tern` binary next to this test binary (`target/<profile>/tern`), built once per test
/// process when it is older than the `platform` library the tests link; `TERN_BIN`
/// overrides it.
///
/// # Panics
///
/// When the binary cannot be built.
pub fn tern_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("TERN_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("path of the test binary");
        // target/debug/deps/<test binary> -> target/debug/tern
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary is in target/<profile>/deps");
        let bin = profile_dir.join(format!("tern{}", std::env::consts::EXE_SUFFIX));
        // The platform library this test was built with (under deps/: `cargo test -p
        // tern-tests` does not refresh target/<profile>/libplatform.rlib).
        let newest_lib = std::fs::read_dir(profile_dir.join("deps"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("libplatform-") && name.ends_with(".rlib")
            })
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max();
        let stale = match std::fs::metadata(&bin).and_then(|b| b.modified()) {
            Ok(built) => newest_lib.is_some_and(|lib| built < lib),
            Err(_) => true,
        };
        if stale {
            // Built with the profile of this test (target/debug is cargo's `dev`).
            let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
                Some("debug") | None => "dev",
                Some(other) => other,
            };
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args([
                    "build",
                    "-p",
                    "platform",
                    "--bin",
                    "tern",
                    "--profile",
                    profile,
                ])
                .status()
                .expect("run cargo build for the tern binary");
            assert!(
                status.success(),
                "cargo build -p platform --bin tern --profile {profile} failed"
            );
        }
        assert!(bin.exists(), "{} does not exist", bin.display());
        bin
    })
}

/// What a finished CLI call printed.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

impl CliOutput {
    /// The last non-empty stdout line.
    pub fn last_line(&self) -> &str {
        self.stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
    }

    /// Panics with the whole output unless the exit code is `code`.
    pub fn expect_code(self, code: i32) -> Self {
        assert_eq!(
            self.code,
            Some(code),
            "unexpected exit code; stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A running CLI call; killed and reaped on drop.
pub struct Running {
    child: Child,
    out: Option<std::thread::JoinHandle<String>>,
    err: Option<std::thread::JoinHandle<String>>,
    args: Vec<String>,
}

fn drain<R: Read + Send + 'static>(r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(r).read_to_string(&mut s);
        s
    })
}

/// Starts `tern ARGS..` without waiting.
///
/// # Panics
///
/// When the process cannot be started.
pub fn spawn_tern(args: &[&str]) -> Running {
    let mut child = Command::new(tern_bin())
        .args(args)
        .env("TERN_KEY", crate::operator_key_path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tern");
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    Running {
        child,
        out,
        err,
        args: args.iter().map(|s| s.to_string()).collect(),
    }
}

impl Running {
    /// Waits for the call to end.
    ///
    /// # Panics
    ///
    /// When it is still running after `timeout` (it is killed first).
    pub fn wait(mut self, timeout: Duration) -> CliOutput {
        let status = wait_child(&mut self.child, timeout);
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let stdout = self
            .out
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let stderr = self
            .err
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let Some(status) = status else {
            panic!(
                "tern {:?} still running after {timeout:?}; stdout:\n{stdout}\nstderr:\n{stderr}",
                self.args
            );
        };
        CliOutput {
            code: status.code(),
            stdout,
            stderr,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `tern ARGS..` to the end, for at most `timeout`.
pub fn tern(args: &[&str], timeout: Duration) -> CliOutput {
    spawn_tern(args).wait(timeout)
}

/// A key made by `tern keygen --json`.
#[derive(Debug, Clone)]
pub struct KeyFile {
    /// The PEM file.
    pub path: PathBuf,
    /// `ed25519:<hex>`.
    pub public_key: String,
    /// The libp2p peer id of the key.
    pub peer_id: String,
}

/// `tern keygen --json --out DIR/NAME.pem`.
pub fn keygen(dir: &Path, name: &str) -> KeyFile {
    let path = dir.join(format!("{name}.pem"));
    let out = tern(
        &[
            "keygen",
            "--json",
            "--out",
            path.to_str().expect("utf-8 path"),
        ],
        QUICK,
    )
    .expect_code(0);
    let v: serde_json::Value =
        serde_json::from_str(out.last_line()).expect("keygen --json prints JSON");
    KeyFile {
        path,
        public_key: v["public_key"].as_str().expect("public_key").to_string(),
        peer_id: v["peer_id"].as_str().expect("peer_id").to_string(),
    }
}

/// Writes `source` to DIR/NAME.rhai and signs it with `tern pack` into DIR/NAME.tern.
pub fn pack(dir: &Path, name: &str, source: &str, author: &KeyFile) -> PathBuf {
    pack_binding(dir, name, source, author, &[])
}

/// [`pack`], declaring resource bindings (`"counts=move"`).
pub fn pack_binding(
    dir: &Path,
    name: &str,
    source: &str,
    author: &KeyFile,
    bindings: &[&str],
) -> PathBuf {
    let script = dir.join(format!("{name}.rhai"));
    std::fs::write(&script, source).expect("write the script");
    let out = dir.join(format!("{name}.tern"));
    let mut args = vec![
        "pack",
        script.to_str().expect("utf-8 path"),
        "--key",
        author.path.to_str().expect("utf-8 path"),
        "--out",
        out.to_str().expect("utf-8 path"),
    ];
    for binding in bindings {
        args.extend(["--resource", binding]);
    }
    tern(&args, QUICK).expect_code(0);
    out
}

/// A TOML list of strings.
pub fn toml_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The configuration file of one `tern node` (key, data and config in `dir`).
#[derive(Debug, Clone)]
pub struct NodeFile {
    /// Node name.
    pub name: String,
    /// Directory holding the key, the data directory and the config.
    pub dir: PathBuf,
    /// Addresses to dial at start.
    pub bootstrap: Vec<String>,
    /// TOML value of `[trust] authors`: `"\"any\""` or a list.
    pub authors: String,
    /// TOML value of `[trust] accept_from`.
    pub accept_from: String,
    /// `"none"` or `"fsync"`.
    pub durability: String,
    /// TOML appended to the file (`[resources.NAME]` sections), if any.
    pub extra: String,
}

impl NodeFile {
    /// A node that trusts `authors` (a TOML value), accepts pushes from any peer and does
    /// not fsync.
    pub fn new(dir: &Path, name: &str, authors: &str) -> Self {
        NodeFile {
            name: name.into(),
            dir: dir.to_path_buf(),
            bootstrap: Vec::new(),
            authors: authors.into(),
            accept_from: "\"any\"".into(),
            durability: "none".into(),
            extra: String::new(),
        }
    }

    /// The node's key file.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join(format!("{}-data", self.name))
    }

    /// Writes the TOML file and returns its path.
    pub fn write(&self) -> PathBuf {
        let path = self.dir.join(format!("{}.toml", self.name));
        let bootstrap: Vec<&str> = self.bootstrap.iter().map(String::as_str).collect();
        let text = format!(
            "name = {:?}\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nbootstrap = {}\nkey = {:?}\ndata_dir = {:?}\nmdns = false\ndurability = {:?}\n[trust]\nauthors = {}\naccept_from = {}\noperators = [\"{}\"]\n",
            self.name,
            toml_list(&bootstrap),
            self.key_path(),
            self.data_dir(),
            self.durability,
            self.authors,
            self.accept_from,
            crate::operator_key().public(),
        ) + self.extra.as_str();
        std::fs::write(&path, text).expect("write the node config");
        path
    }
}

/// A `tern node` process; killed and reaped on drop. Its stdout and stderr are drained into
/// [`TernNode::log`] by threads, so its pipes never fill.
pub struct TernNode {
    child: Child,
    /// Node name.
    pub name: String,
    /// The address it printed, ending in `/p2p/<peer id>`.
    pub addr: String,
    /// Its peer id.
    pub peer_id: String,
    log: Arc<Mutex<String>>,
}

impl TernNode {
    /// Writes `file` and starts `tern node --config` on it, with `TERN_FAULT=fault` if
    /// given; waits until it prints its address.
    ///
    /// # Panics
    ///
    /// When the node does not print an address within 30 s (the log is in the message).
    pub fn start(file: &NodeFile, fault: Option<&str>) -> TernNode {
        let config = file.write();
        let mut cmd = Command::new(tern_bin());
        cmd.arg("node")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .env_remove("TERN_FAULT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(f) = fault {
            cmd.env("TERN_FAULT", f);
        }
        let mut child = cmd.spawn().expect("start tern node");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let out_log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on ") {
                    if addr.starts_with("/ip4/127.0.0.1/") {
                        let _ = tx.send(addr.trim().to_string());
                    }
                }
                let mut l = out_log.lock().unwrap_or_else(|e| e.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        let err_log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = err_log.lock().unwrap_or_else(|e| e.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut node = TernNode {
            child,
            name: file.name.clone(),
            addr: String::new(),
            peer_id: String::new(),
            log,
        };
        match rx.recv_timeout(QUICK) {
            Ok(addr) => {
                node.peer_id = addr
                    .rsplit_once("/p2p/")
                    .map(|(_, p)| p.to_string())
                    .expect("address ends in /p2p/<peer id>");
                node.addr = addr;
                node
            }
            Err(_) => {
                node.kill();
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "node {} printed no address within {QUICK:?}; log:\n{}",
                    file.name,
                    node.log()
                );
            }
        }
    }

    /// Everything the node printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Kills the process (SIGKILL: no chance to clean up, like a crash) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the process where it is (SIGSTOP): its connections stay open and nothing it is
    /// asked is answered, as a node that hangs. [`TernNode::resume`] lets it go on.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid");
        // SAFETY: kill(2) has no memory effects; the pid is this test's own child, not reaped
        // before the node is dropped.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "kill({pid}, {signal}) failed");
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, timeout)
    }

    /// `tern status --node ADDR --json`.
    pub fn status(&self) -> serde_json::Value {
        status(&self.addr)
    }

    /// Its status over the control protocol (without the CLI: see [`crate::ctl`]).
    pub fn report(&self) -> platform::wire::StatusReport {
        crate::ctl::status(&self.addr)
    }

    /// Waits until the node reports every one of `names` among its peers.
    pub fn wait_for_peers(&self, names: &[&str]) {
        crate::wait_for(
            &format!("{} to see peers {names:?}", self.name),
            QUICK,
            || {
                let report = self.report();
                names
                    .iter()
                    .all(|n| report.peers.iter().any(|(p, _)| p == n))
                    .then_some(())
            },
        )
    }

    /// How many lines of its log contain `needle`.
    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }
}

impl Drop for TernNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `tern status --node ADDR --json`, parsed.
///
/// # Panics
///
/// The call fails or prints something else than JSON.
pub fn status(addr: &str) -> serde_json::Value {
    let out = tern(&["status", "--node", addr, "--json"], QUICK).expect_code(0);
    serde_json::from_str(out.last_line())
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", out.stdout))
}

/// The peer names in a status report.
pub fn peer_names(status: &serde_json::Value) -> Vec<String> {
    status["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The ids of the agents a status report lists.
pub fn agent_ids(status: &serde_json::Value) -> Vec<String> {
    status["agents"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Where a status report's forwarding pointer for `agent` points, if it has one.
pub fn forward_of(status: &serde_json::Value, agent: &str) -> Option<String> {
    status["forwards"].as_array()?.iter().find_map(|f| {
        (f["agent"].as_str() == Some(agent)).then(|| f["to"].as_str().unwrap_or("").to_string())
    })
}
