//! Shared support for end-to-end tests: sign a script for a test mesh, and the runtime nodes
//! need.

use security::{PeersPolicy, SecretKey, TrustPolicy, VerifiedPackage};

/// The tests' allocator: the system's, metered as in `tern`, so that agents' memory budgets
/// hold in the nodes the tests start.
#[global_allocator]
static ALLOC: agent_lang::Metered<std::alloc::System> = agent_lang::Metered(std::alloc::System);

/// Signs `source` with a fresh author key; returns the package and a trust policy that trusts
/// that author and accepts pushes from any peer.
pub fn package(source: &str) -> (VerifiedPackage, TrustPolicy) {
    package_binding(source, &[])
}

/// [`package`], declaring resource bindings (`("shard", "rebind")`).
pub fn package_binding(source: &str, bindings: &[(&str, &str)]) -> (VerifiedPackage, TrustPolicy) {
    let key = SecretKey::generate();
    let spec = platform::package_files::PackSpec {
        name: "test".into(),
        version: "0".into(),
        resources: bindings
            .iter()
            .map(|(name, policy)| security::ResourceDecl {
                name: name.to_string(),
                policy: policy.parse().unwrap_or_else(|e| panic!("{e}")),
            })
            .collect(),
        capabilities: vec![],
        limits: Default::default(),
    };
    let package = platform::package_files::pack(source.to_string(), spec, &key, 0)
        .and_then(|p| Ok(p.verify()?))
        .unwrap_or_else(|e| panic!("test agent does not pack: {e:#}"));
    let mut trust: TrustPolicy = toml::from_str(&format!(
        "authors = [{{ key = \"{}\", resources = \"any\" }}]",
        key.public()
    ))
    .unwrap_or_default();
    trust.accept_from = PeersPolicy::Any;
    (package, trust)
}

/// The operator key of every test node started from a configuration file (`tests/fixtures`,
/// a key made for the tests and for nothing else): `tern launch|status|send|result` speak with
/// it (`TERN_KEY`), and the nodes list it in `[trust] operators`.
pub fn operator_key_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/operator.pem")
}

/// The key at [`operator_key_path`].
pub fn operator_key() -> SecretKey {
    platform::package_files::read_key(&operator_key_path())
        .unwrap_or_else(|e| panic!("the tests' operator key: {e:#}"))
}

/// A runtime like `tern`'s: multi-threaded, with room for Rhai's recursion on its threads.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(64 << 20)
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"))
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `timeout`.
///
/// # Panics
///
/// When `timeout` passes first; the message says what was awaited.
pub fn wait_for<T>(
    what: &str,
    timeout: std::time::Duration,
    check: impl FnMut() -> Option<T>,
) -> T {
    wait_for_or(what, timeout, check, String::new)
}

/// [`wait_for`], with `context` (the nodes' logs, say) added to the message when `timeout`
/// passes first.
///
/// # Panics
///
/// When `timeout` passes first.
pub fn wait_for_or<T>(
    what: &str,
    timeout: std::time::Duration,
    mut check: impl FnMut() -> Option<T>,
    context: impl FnOnce() -> String,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Polls `check` every 10 ms, without holding the runtime's thread, until it holds.
///
/// # Panics
///
/// When it does not hold within 20 s.
pub async fn eventually(mut check: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if check() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("condition not reached within 20 s");
}

/// Separate `tern` processes: node daemons on loopback and CLI invocations, every one of them
/// killed and reaped when its guard drops, every wait bounded.
pub mod process {
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
        let script = dir.join(format!("{name}.rhai"));
        std::fs::write(&script, source).expect("write the script");
        let out = dir.join(format!("{name}.tern"));
        tern(
            &[
                "pack",
                script.to_str().expect("utf-8 path"),
                "--key",
                author.path.to_str().expect("utf-8 path"),
                "--out",
                out.to_str().expect("utf-8 path"),
            ],
            QUICK,
        )
        .expect_code(0);
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
            );
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
}

/// A raw libp2p peer that speaks tern's wire protocols by hand, for hostile-peer tests: it can
/// open hop streams and write anything on them, serves the packages it is given, and records
/// the agent ends nodes report to it (when it names itself as an agent's home), and answers
/// whether the hops it sent committed ([`RawPeer::record_departure`]).
pub mod raw_peer {
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures::StreamExt;
    use libp2p::{Multiaddr, PeerId};
    use platform::wire::{
        read_frame, write_frame, AgentEnd, ClientRequest, ControlRefusal, ControlReply,
        ControlRequest, HandoverSignature, HopHandover, HopOffer, HopRefusal, HopReply,
        PackageReply, PackageRequest, CLIENT_PROTOCOL, CONTROL_PROTOCOL, HOP_PROTOCOL, MAX_FRAME,
        PACKAGE_PROTOCOL,
    };
    use security::{
        AgentId, HopEnvelope, HopFields, LaunchNonce, PublicKey, SecretKey, VerifiedPackage,
    };

    type Packages = Arc<Mutex<HashMap<[u8; 32], Vec<u8>>>>;

    /// The raw peer. Its swarm runs on a task that is aborted on drop.
    pub struct RawPeer {
        /// Its key: the connection's identity and the key it signs envelopes with.
        pub key: SecretKey,
        /// Its peer id.
        pub peer_id: PeerId,
        control: libp2p_stream::Control,
        node: PeerId,
        connected: tokio::sync::watch::Receiver<bool>,
        packages: Packages,
        ended: Arc<Mutex<Vec<(String, AgentEnd)>>>,
        departures: Arc<Mutex<HashSet<[u8; 32]>>>,
        offers: Arc<Mutex<Vec<HopOffer>>>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    }

    impl RawPeer {
        /// A peer with identity `key` that will talk to the node at `node` (ending in
        /// `/p2p/<peer id>`). Must be called inside a tokio runtime.
        ///
        /// # Panics
        ///
        /// The address has no peer id or the transport cannot be built.
        pub fn new(key: SecretKey, node: &Multiaddr) -> RawPeer {
            let Some(libp2p::multiaddr::Protocol::P2p(node_id)) = node.iter().last() else {
                panic!("{node} does not end in /p2p/<peer id>");
            };
            let keypair =
                libp2p::identity::Keypair::ed25519_from_bytes(key.seed()).expect("ed25519 key");
            let peer_id = keypair.public().to_peer_id();
            let mut swarm =
                platform::wire::swarm(keypair, |_| libp2p_stream::Behaviour::new()).expect("swarm");
            // libp2p-stream keeps no addresses: dial by peer id, so that `open_stream` waits for
            // this dial.
            swarm
                .dial(
                    libp2p::swarm::dial_opts::DialOpts::peer_id(node_id)
                        .addresses(vec![node.clone()])
                        .build(),
                )
                .expect("dial the node");
            let mut control = swarm.behaviour().new_control();
            let mut package_streams = control.accept(PACKAGE_PROTOCOL).expect("accept pkg");
            let mut control_streams = control.accept(CONTROL_PROTOCOL).expect("accept ctl");
            let mut hop_streams = control.accept(HOP_PROTOCOL).expect("accept hop");
            let packages: Packages = Arc::default();
            let ended: Arc<Mutex<Vec<(String, AgentEnd)>>> = Arc::default();
            // Streams are opened only once the connection is up: opening one while the dial is
            // still pending occasionally never completed (seen about once in 30 runs).
            let (connected_tx, connected) = tokio::sync::watch::channel(false);
            let mut tasks = vec![tokio::spawn(async move {
                loop {
                    if let libp2p::swarm::SwarmEvent::ConnectionEstablished { peer_id, .. } =
                        swarm.select_next_some().await
                    {
                        if peer_id == node_id {
                            let _ = connected_tx.send(true);
                        }
                    }
                }
            })];
            let served = packages.clone();
            tasks.push(tokio::spawn(async move {
                while let Some((_, mut stream)) = package_streams.next().await {
                    let served = served.clone();
                    tokio::spawn(async move {
                        let Ok(req) = read_frame::<_, PackageRequest>(&mut stream, 1024).await
                        else {
                            return;
                        };
                        let bytes = served
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&req.hash)
                            .cloned();
                        let reply = bytes.map_or(PackageReply::NotFound, PackageReply::Found);
                        let _ = write_frame(&mut stream, &reply).await;
                    });
                }
            }));
            let ends = ended.clone();
            let departures: Arc<Mutex<HashSet<[u8; 32]>>> = Arc::default();
            let recorded = departures.clone();
            let signer = key.clone();
            tasks.push(tokio::spawn(async move {
                while let Some((_, mut stream)) = control_streams.next().await {
                    let (ends, recorded, signer) = (ends.clone(), recorded.clone(), signer.clone());
                    tokio::spawn(async move {
                        let reply =
                            match read_frame::<_, ControlRequest>(&mut stream, MAX_FRAME).await {
                                Ok(ControlRequest::Ended { agent, end, .. }) => {
                                    ends.lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .push((agent, end));
                                    ControlReply::Ok
                                }
                                Ok(ControlRequest::HopCommitted { envelope, .. }) => {
                                    ControlReply::HopCommitted(
                                        recorded
                                            .lock()
                                            .unwrap_or_else(|e| e.into_inner())
                                            .contains(&envelope),
                                    )
                                }
                                Ok(ControlRequest::Departed { envelope, .. }) => {
                                    let departed = recorded
                                        .lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .contains(&envelope);
                                    ControlReply::HandedOver(departed.then(|| {
                                        handover_of(&security::EnvelopeHash(envelope), &signer)
                                    }))
                                }
                                _ => ControlReply::Refused(ControlRefusal::UnexpectedReply(
                                    "raw peer".into(),
                                )),
                            };
                        let _ = write_frame(&mut stream, &reply).await;
                    });
                }
            }));
            // Hops offered to the raw peer are kept and refused.
            let offers: Arc<Mutex<Vec<HopOffer>>> = Arc::default();
            let offered = offers.clone();
            tasks.push(tokio::spawn(async move {
                while let Some((_, mut stream)) = hop_streams.next().await {
                    if let Ok(offer) = read_frame::<_, HopOffer>(&mut stream, MAX_FRAME).await {
                        offered
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(offer);
                        let refusal = HopReply::Refused(HopRefusal::LivesHere);
                        let _ = write_frame(&mut stream, &refusal).await;
                    }
                }
            }));
            RawPeer {
                key,
                peer_id,
                control,
                node: node_id,
                connected,
                packages,
                ended,
                departures,
                offers,
                tasks,
            }
        }

        /// The hops the node offered to this peer (each was refused).
        pub fn offers(&self) -> Vec<HopOffer> {
            self.offers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        }

        /// Opens a hop stream to the node.
        ///
        /// # Panics
        ///
        /// The node cannot be reached within 15 s.
        pub async fn open_hop(&self) -> libp2p::Stream {
            self.open(HOP_PROTOCOL).await
        }

        /// Waits (up to 15 s) until the connection to the node is established.
        async fn connected(&self) {
            let mut c = self.connected.clone();
            tokio::time::timeout(Duration::from_secs(15), c.wait_for(|up| *up))
                .await
                .expect("connect to the node: timed out")
                .expect("the swarm task ended");
        }

        /// Opens a hop stream to the node, returning the error instead of panicking.
        ///
        /// # Errors
        ///
        /// The stream cannot be opened.
        pub async fn open_hop_unchecked(&self) -> Result<libp2p::Stream, String> {
            self.connected().await;
            self.control
                .clone()
                .open_stream(self.node, HOP_PROTOCOL)
                .await
                .map_err(|e| e.to_string())
        }

        /// Opens a stream of `protocol` to the node.
        ///
        /// # Panics
        ///
        /// The node cannot be reached within 15 s.
        pub async fn open(&self, protocol: libp2p::StreamProtocol) -> libp2p::Stream {
            self.connected().await;
            tokio::time::timeout(
                Duration::from_secs(15),
                self.control.clone().open_stream(self.node, protocol),
            )
            .await
            .expect("open a stream: timed out")
            .expect("open a stream")
        }

        /// One control request, its first reply, and the stream for any further replies.
        pub async fn control(&self, request: &ControlRequest) -> (ControlReply, libp2p::Stream) {
            self.request(CONTROL_PROTOCOL, request).await
        }

        /// One client request (as an operator's CLI would send it), its first reply, and the
        /// stream for any further replies.
        pub async fn client(&self, request: &ClientRequest) -> (ControlReply, libp2p::Stream) {
            self.request(CLIENT_PROTOCOL, request).await
        }

        async fn request(
            &self,
            protocol: libp2p::StreamProtocol,
            request: &impl serde::Serialize,
        ) -> (ControlReply, libp2p::Stream) {
            let mut stream = self.open(protocol).await;
            write_frame(&mut stream, request)
                .await
                .expect("send a request");
            let reply = read_frame(&mut stream, MAX_FRAME)
                .await
                .expect("control reply");
            (reply, stream)
        }

        /// Answers package downloads of `package` (as its hash) with `bytes`.
        pub fn serve(&self, package: &VerifiedPackage, bytes: Vec<u8>) {
            self.packages
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(*package.hash().as_bytes(), bytes);
        }

        /// From now on, answers that the hop with this envelope hash committed (as a source
        /// whose departure record is durable); other hops did not.
        pub fn record_departure(&self, envelope: [u8; 32]) {
            self.departures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(envelope);
        }

        /// Agent ends reported to this peer so far.
        pub fn ended(&self) -> Vec<(String, AgentEnd)> {
            self.ended.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }
    }

    impl Drop for RawPeer {
        fn drop(&mut self) {
            for t in &self.tasks {
                t.abort();
            }
        }
    }

    /// `key`'s signature that it handed an agent over by the hop with envelope hash `envelope`.
    pub fn handover_of(envelope: &security::EnvelopeHash, key: &SecretKey) -> HandoverSignature {
        HandoverSignature(security::sign_handover(envelope, key))
    }

    /// The handover of the hop `offer` by `key` (its sender), as a source sends it after
    /// `Stored`.
    pub fn handover_after(offer: &HopOffer, key: &SecretKey) -> HopHandover {
        let hash = security::EnvelopeHash(*blake3::hash(&offer.envelope).as_bytes());
        HopHandover(handover_of(&hash, key))
    }

    /// A first hop of a fresh agent of `package`, prepared the way a source node does it: the
    /// agent runs here until its first `migrate`, its continuation is encoded, and an envelope
    /// from `signer` to `dest` is signed. `home` is the peer id the node reports the end to.
    ///
    /// # Panics
    ///
    /// The package does not compile or does not reach a `migrate`.
    pub fn first_hop(
        package: &VerifiedPackage,
        signer: &SecretKey,
        from: PublicKey,
        dest: PublicKey,
        home: &str,
    ) -> (HopOffer, Vec<u8>) {
        // An agent launched by `home` (if it is a peer id: otherwise by a throwaway key).
        let home_key =
            PublicKey::from_peer_id_str(home).unwrap_or_else(|_| SecretKey::generate().public());
        let nonce = LaunchNonce::generate();
        let agent_id = AgentId::launched(&home_key, &nonce);
        first_hop_of((agent_id, nonce), package, signer, from, dest, home)
    }

    /// [`first_hop`] for a given agent id and the nonce the offer names (the id need not be
    /// the one `home` launched with it).
    pub fn first_hop_of(
        (agent_id, nonce): (AgentId, LaunchNonce),
        package: &VerifiedPackage,
        signer: &SecretKey,
        from: PublicKey,
        dest: PublicKey,
        home: &str,
    ) -> (HopOffer, Vec<u8>) {
        let limits = platform::package_files::limits_for(
            &package.manifest().limits,
            agent_lang::Limits::default(),
        );
        let program = agent_lang::Program::compile(package.source(), &limits).expect("compile");
        let mut exec = agent_lang::Execution::new(&program);
        let env = agent_lang::HostEnv {
            resources: agent_lang::no_resources(),
            here: "raw".into(),
            home: "raw".into(),
            nodes: vec!["raw".into()],
            agent_id: agent_id.to_string(),
            hops: 0,
            printer: Arc::new(|_| {}),
        };
        match exec.resume(&env, agent_lang::Resume::Start) {
            agent_lang::Outcome::Migrate { .. } => {}
            other => panic!("the agent must start with a migrate, got {other:?}"),
        }
        let continuation = exec.encode().expect("encode the continuation");
        let envelope = HopEnvelope::sign(
            HopFields {
                agent_id,
                hop: security::FIRST_HOP,
                package_hash: package.hash(),
                continuation_hash: *blake3::hash(&continuation).as_bytes(),
                previous: None,
                from,
                to: dest,
                time_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            },
            signer,
        );
        // `sign` refuses a key that is not `from`; a forged envelope is signed by its own key.
        let envelope = envelope.unwrap_or_else(|_| {
            panic!("sign with the key of `from`; use a HopFields with from = signer.public()")
        });
        let offer = HopOffer {
            envelope: envelope.encode(),
            previous: Vec::new(),
            previous_handover: None,
            continuation_len: continuation.len() as u64,
            // The raw path (Ready, then the bytes); tests that want the inline one fill it.
            inline: Vec::new(),
            hops: 1,
            operations: 0,
            sent: Default::default(),
            prepared_micros: 0,
            messages: Vec::new(),
            home: home.to_string(),
            nonce: nonce.0,
            certificate: Vec::new(),
            launcher: None,
            custody: Vec::new(),
        };
        (offer, continuation)
    }
}

pub mod ctl;
pub mod disk;
