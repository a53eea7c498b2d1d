//! The mesh benchmarks: real tern nodes (libp2p, TCP + noise + yamux on 127.0.0.1, redb stores in
//! temporary directories) in one process, measured in one run and printed as a markdown table
//! with the target next to each figure.
//!
//! `cargo run --release -p platform --example bench_mesh [BENCH ...] [--option value ...]`
//!
//! Benches (all when none is named): `latency` (hop latency and single-agent hops per second,
//! store without fsync), `fsync` (the same with fsync on both sides, against this machine's
//! fsync latency), `concurrent` (many agents in flight), `bulk` (a 100 MB continuation hop
//! against a raw libp2p-stream transfer of the same bytes), `resident` (resident agents on one
//! node, in a child process so its RSS is the node's alone), `flood` (hop latency while ten
//! throwaway identities flood the destination with garbage and stalled streams, against the
//! same without them, taking turns), `hostile` (the RSS a node reaches above idle while one
//! hostile script runs under the default limits: each of the two nodes in a child process of its
//! own), `parts` (component timings that explain the figures: store commits, envelope
//! sign/verify, continuation encode/decode).
//!
//! Options: `--hops N` (hops of the bouncing agent, default 1000), `--agents N` (agents in
//! flight, default 200), `--agent-hops N` (hops each of those makes, default 50), `--bulk-mb N`
//! (default 100), `--resident N` (default 10000), `--runs N` (measured runs of the bulk hop and
//! the raw transfer, taking turns, default 7), `--repeats N` (measured repetitions of the
//! one-agent and the many-agent runs, default 5: each lasts under a second, so one hiccup of
//! the machine would decide a single one; the figure is their median, with their range; also
//! the rounds in which fsync probes and durable hops take turns), `--hostile-script INDEX` (only
//! that row of `hostile`, counted from 0).

use std::fmt::Write as _;
use std::io::{BufRead, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

// jemalloc, configured for large hops: see `platform::memory`.
platform::jemalloc_for_large_hops!();

use agent_lang::{Execution, HostEnv, Limits, Outcome, Program, Resume};
use anyhow::{anyhow, bail, Context, Result};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol, Swarm};
use platform::loopback::LoopbackMesh;
use platform::node::{Node, NodeConfig, NodeEvent, NodeHandle};
use platform::store::{AgentMeta, AgentRecord, AgentState, Durability, Store};
use platform::wire::AgentEnd;
use security::{
    verify_hop, AgentId, HopCheck, HopEnvelope, HopFields, LaunchNonce, PeersPolicy, SecretKey,
    TrustPolicy, VerifiedPackage, FIRST_HOP,
};
use tokio::sync::mpsc;

const BENCHES: [&str; 8] = [
    "latency",
    "flood",
    "fsync",
    "concurrent",
    "bulk",
    "resident",
    "hostile",
    "parts",
];

struct Options {
    benches: Vec<String>,
    hops: u64,
    agents: usize,
    agent_hops: u64,
    bulk_mb: usize,
    resident: usize,
    runs: usize,
    repeats: usize,
    /// Only this row of the `hostile` bench (its index in `HOSTILE`).
    hostile_script: Option<usize>,
}

fn parse_args(args: &[String]) -> Result<Options> {
    let mut o = Options {
        benches: Vec::new(),
        hops: 1000,
        agents: 200,
        agent_hops: 50,
        bulk_mb: 100,
        resident: 10_000,
        runs: 7,
        repeats: 5,
        hostile_script: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<u64> {
            it.next()
                .with_context(|| format!("{name} needs a value"))?
                .replace('_', "")
                .parse::<u64>()
                .with_context(|| format!("{name} needs a number"))
        };
        match a.as_str() {
            "--hops" => o.hops = value(a)?.max(2),
            "--agents" => o.agents = value(a)?.max(1) as usize,
            "--agent-hops" => o.agent_hops = value(a)?.max(2),
            "--bulk-mb" => o.bulk_mb = value(a)?.max(1) as usize,
            "--resident" => o.resident = value(a)?.max(1) as usize,
            "--runs" => o.runs = value(a)?.max(1) as usize,
            "--repeats" => o.repeats = value(a)?.max(1) as usize,
            "--hostile-script" => {
                let index = value(a)? as usize;
                if index >= HOSTILE.len() {
                    bail!("--hostile-script: {index} is not below {}", HOSTILE.len());
                }
                o.hostile_script = Some(index);
            }
            "-h" | "--help" => {
                println!(
                    "usage: bench_mesh [{}] [--hops N] [--agents N] [--agent-hops N] \
                     [--bulk-mb N] [--resident N] [--runs N] [--repeats N] \
                     [--hostile-script INDEX]",
                    BENCHES.join("|")
                );
                std::process::exit(0);
            }
            b if BENCHES.contains(&b) => o.benches.push(b.to_string()),
            other => bail!(
                "unknown argument '{other}' (benches: {})",
                BENCHES.join(", ")
            ),
        }
    }
    if o.benches.is_empty() {
        o.benches = BENCHES.iter().map(|s| s.to_string()).collect();
    }
    Ok(o)
}

/// A runtime like `tern`'s: multi-threaded, with room for Rhai's recursion on its threads.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(64 << 20)
        .build()?)
}

/// One author key for every bench agent, and a policy that trusts it and takes pushes from
/// any peer.
struct Author {
    key: SecretKey,
    trust: TrustPolicy,
}

impl Author {
    fn new() -> Result<Author> {
        Author::with_key(SecretKey::generate())
    }

    /// The author whose key has this seed (64 hex digits).
    fn from_seed(hex: &str) -> Result<Author> {
        let mut seed = [0u8; 32];
        for (i, byte) in seed.iter_mut().enumerate() {
            let digits = hex
                .get(2 * i..2 * i + 2)
                .context("a seed has 64 hex digits")?;
            *byte = u8::from_str_radix(digits, 16)?;
        }
        Author::with_key(SecretKey::from_seed(seed))
    }

    fn with_key(key: SecretKey) -> Result<Author> {
        let mut trust: TrustPolicy = toml::from_str(&format!("authors = [\"{}\"]", key.public()))?;
        trust.accept_from = PeersPolicy::Any;
        Ok(Author { key, trust })
    }

    fn sign(&self, source: String) -> Result<VerifiedPackage> {
        let spec = platform::package_files::PackSpec {
            name: "bench".into(),
            version: "0".into(),
            resources: vec![],
            capabilities: vec![],
            limits: Default::default(),
        };
        Ok(platform::package_files::pack(source, spec, &self.key, 0)?.verify()?)
    }
}

fn bouncer(hops: u64) -> String {
    format!(
        "let i = 0;\n\
         while i < {hops} {{\n\
             let to = if here() == \"node-0\" {{ \"node-1\" }} else {{ \"node-0\" }};\n\
             migrate(to);\n\
             i += 1;\n\
         }}\n\
         i"
    )
}

/// The bouncer for many agents at once: a hop the destination drops (see the report) throws in
/// the agent, which counts it and tries again; the result is `[hops, failed attempts]`.
fn retrying_bouncer(hops: u64) -> String {
    format!(
        "let i = 0;\n\
         let failed = 0;\n\
         while i < {hops} {{\n\
             let to = if here() == \"node-0\" {{ \"node-1\" }} else {{ \"node-0\" }};\n\
             try {{ migrate(to); i += 1; }} catch (e) {{ failed += 1; }}\n\
         }}\n\
         [i, failed]"
    )
}

/// Launches `package` on `node`, waits (bounded) for its end, checks it finished.
async fn run_agent(node: &NodeHandle, package: VerifiedPackage, limit: Duration) -> Result<u64> {
    Ok(run_agent_json(node, package, limit).await?.0)
}

/// [`run_agent`], with the agent's result as JSON.
async fn run_agent_json(
    node: &NodeHandle,
    package: VerifiedPackage,
    limit: Duration,
) -> Result<(u64, String)> {
    let (_, end) = node.launch(package, None).map_err(anyhow::Error::msg)?;
    match tokio::time::timeout(limit, end)
        .await
        .map_err(|_| anyhow!("the agent did not end within {limit:?}"))?
        .context("the node stopped before the agent ended")?
    {
        AgentEnd::Finished { hops, json, .. } => Ok((hops, json)),
        AgentEnd::Failed { error, node, .. } => bail!("the agent failed on {node}: {error}"),
    }
}

/// A hop as the destination's `NodeEvent::HopStored` reports it.
struct HopRecord {
    bytes: usize,
    micros: u64,
}

/// The hops `nodes` store from now on, read from their event streams (one task per node, which
/// ends with the node).
fn hop_records(nodes: &[NodeHandle]) -> mpsc::UnboundedReceiver<HopRecord> {
    let (tx, rx) = mpsc::unbounded_channel();
    for node in nodes {
        let mut events = node.events();
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(NodeEvent::HopStored { bytes, micros, .. }) => {
                        let _ = tx.send(HopRecord { bytes, micros });
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(lost)) => {
                        eprintln!("bench_mesh: {lost} hop events lost (the reader fell behind)");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
    }
    rx
}

fn drain(rx: &mut mpsc::UnboundedReceiver<HopRecord>) -> Vec<HopRecord> {
    let mut v = Vec::new();
    while let Ok(r) = rx.try_recv() {
        v.push(r);
    }
    v
}

/// Percentile `p` (0..=100) of a sorted slice.
fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The lowest and the highest of `v`.
fn range(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

struct Bounce {
    wall: Duration,
    micros: Vec<u64>,
    bytes: usize,
}

/// Bounces one agent `hops` times between node-0 and node-1 (after a warm-up run of the same
/// package, which also pulls and compiles it on node-1).
async fn bounce(
    nodes: &[NodeHandle],
    author: &Author,
    rx: &mut mpsc::UnboundedReceiver<HopRecord>,
    hops: u64,
) -> Result<Bounce> {
    let package = author.sign(bouncer(hops))?;
    let limit = Duration::from_secs(60 + hops / 50);
    run_agent(&nodes[0], package.clone(), limit).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drain(rx);
    let t = Instant::now();
    let made = run_agent(&nodes[0], package, limit).await?;
    let wall = t.elapsed();
    if made != hops {
        bail!("the agent made {made} hops, not {hops}");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let recs = drain(rx);
    let bytes = recs.iter().map(|r| r.bytes).max().unwrap_or(0);
    let mut micros: Vec<u64> = recs.into_iter().map(|r| r.micros).collect();
    micros.sort_unstable();
    Ok(Bounce {
        wall,
        micros,
        bytes,
    })
}

/// Two nodes with fsync'd stores (the durable default), in temporary directories.
async fn fsync_pair(author: &Author) -> Result<(Vec<NodeHandle>, Vec<tempfile::TempDir>)> {
    let mut nodes: Vec<NodeHandle> = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..2 {
        let dir = tempfile::tempdir()?;
        let config = NodeConfig {
            bootstrap: nodes
                .iter()
                .flat_map(|h| h.listen_addrs().into_iter().take(1))
                .collect(),
            durability: Durability::Fsync,
            ..NodeConfig::local(
                &format!("node-{i}"),
                SecretKey::generate(),
                dir.path().to_path_buf(),
                author.trust.clone(),
            )
        };
        nodes.push(Node::start(config).await?);
        dirs.push(dir);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while nodes.iter().any(|h| h.peer_names().is_empty()) {
        if Instant::now() > deadline {
            for n in &nodes {
                n.shutdown();
            }
            bail!("the fsync nodes did not find each other within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((nodes, dirs))
}

/// `n` timings of (write 4 KiB + fsync) to a file in the temporary directory, in µs.
fn fsync_latency(n: usize) -> Result<Vec<f64>> {
    let dir = tempfile::tempdir()?;
    let mut f = std::fs::File::create(dir.path().join("probe"))?;
    let block = [0x5au8; 4096];
    for _ in 0..20 {
        f.write_all(&block)?;
        f.sync_all()?;
    }
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f.write_all(&block)?;
            f.sync_all()?;
            Ok(t.elapsed().as_secs_f64() * 1e6)
        })
        .collect::<Result<_>>()?;
    v.sort_by(f64::total_cmp);
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// Flooders: throwaway identities that send garbage

/// Identities flooding the node.
const FLOODERS: usize = 10;
/// Streams each flooder opens a second (garbage requests, one in eight stalled).
const FLOOD_STREAMS_PER_SECOND: u64 = 200;

/// Throwaway identities (in no `accept_from`, no operators) that open streams to `node` on the
/// hop and control protocols as fast as [`FLOOD_STREAMS_PER_SECOND`], each sending garbage: a
/// frame length then random bytes, either closing at once or (one in eight) stalling with its
/// request half sent. Stops when dropped.
struct Flood {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    opened: Arc<std::sync::atomic::AtomicU64>,
}

impl Flood {
    async fn start(node: &Multiaddr) -> Result<Flood> {
        let opened = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let Some(libp2p::multiaddr::Protocol::P2p(target)) = node.iter().last() else {
            bail!("{node} names no peer");
        };
        let mut tasks = Vec::new();
        for f in 0..FLOODERS {
            let mut swarm = bare_swarm()?;
            let control = swarm.behaviour().new_control();
            swarm.dial(node.clone())?;
            tasks.push(tokio::spawn(async move {
                loop {
                    swarm.select_next_some().await;
                }
            }));
            let opened = opened.clone();
            tasks.push(tokio::spawn(async move {
                let mut control = control;
                let mut stalled = Vec::new();
                let mut tick = tokio::time::interval(Duration::from_micros(
                    1_000_000 / FLOOD_STREAMS_PER_SECOND,
                ));
                for n in 0u64.. {
                    tick.tick().await;
                    let protocol = if n % 2 == 0 {
                        platform::wire::HOP_PROTOCOL
                    } else {
                        platform::wire::CONTROL_PROTOCOL
                    };
                    let Ok(mut s) = control.open_stream(target, protocol).await else {
                        continue;
                    };
                    opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let seed = blake3::hash(&[f as u8, (n & 0xff) as u8, (n >> 8) as u8]);
                    let garbage = seed.as_bytes();
                    if n % 8 == 0 {
                        // A request that says 1 MiB and stops after 32 bytes.
                        let _ = s.write_all(&(1u32 << 20).to_be_bytes()).await;
                        let _ = s.write_all(garbage).await;
                        let _ = s.flush().await;
                        stalled.push(s);
                        if stalled.len() > 64 {
                            stalled.remove(0);
                        }
                    } else {
                        let _ = s.write_all(&(garbage.len() as u32).to_be_bytes()).await;
                        let _ = s.write_all(garbage).await;
                        let _ = s.close().await;
                    }
                }
            }));
        }
        Ok(Flood { tasks, opened })
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw libp2p-stream transfer (the ceiling a bulk hop can reach)

const RAW_PROTOCOL: StreamProtocol = StreamProtocol::new("/bench/raw/1");

fn bare_swarm() -> Result<Swarm<libp2p_stream::Behaviour>> {
    platform::wire::swarm(libp2p::identity::Keypair::generate_ed25519(), |_| {
        libp2p_stream::Behaviour::new()
    })
}

/// Two bare swarms on loopback, connected, with a receiver that reads whole transfers and
/// acknowledges each with one byte: the ceiling a bulk hop can reach, measured in the same
/// conditions (interleaved with the hops: this machine's speed drifts).
struct RawPair {
    control: libp2p_stream::Control,
    peer_b: libp2p::PeerId,
    payload: Vec<u8>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RawPair {
    async fn start(bytes: usize) -> Result<RawPair> {
        let a = bare_swarm()?;
        let mut b = bare_swarm()?;
        b.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
        let addr: Multiaddr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = b.select_next_some().await {
                break address;
            }
        };
        let peer_b = *b.local_peer_id();
        let mut incoming = b.behaviour().new_control().accept(RAW_PROTOCOL)?;
        let control = a.behaviour().new_control();
        let mut a = a;
        a.dial(addr)?;
        // Poll both until the connection is up (libp2p-stream keeps no address book).
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                tokio::select! {
                    e = a.select_next_some() => {
                        if let SwarmEvent::ConnectionEstablished { .. } = e {
                            break;
                        }
                    }
                    _ = b.select_next_some() => {}
                }
            }
        })
        .await
        .map_err(|_| anyhow!("the raw swarms did not connect"))?;
        let poll_a = tokio::spawn(async move {
            loop {
                a.select_next_some().await;
            }
        });
        let poll_b = tokio::spawn(async move {
            loop {
                b.select_next_some().await;
            }
        });
        let receiver = tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 20];
            while let Some((_, mut s)) = incoming.next().await {
                let received = async {
                    let mut len = [0u8; 8];
                    s.read_exact(&mut len).await?;
                    let mut left = u64::from_be_bytes(len) as usize;
                    while left > 0 {
                        let want = left.min(buf.len());
                        let n = s.read(&mut buf[..want]).await?;
                        if n == 0 {
                            bail!("raw transfer: early end of stream");
                        }
                        left -= n;
                    }
                    s.write_all(&[1]).await?;
                    s.flush().await?;
                    s.close().await?;
                    Ok::<(), anyhow::Error>(())
                };
                if let Err(e) = received.await {
                    eprintln!("raw transfer: {e}");
                }
            }
        });
        Ok(RawPair {
            control,
            peer_b,
            payload: (0..bytes).map(|i| (i * 31 + 7) as u8).collect(),
            tasks: vec![poll_a, poll_b, receiver],
        })
    }

    /// Sends the payload over a new stream: from the first write to the receiver's
    /// acknowledgement of the last byte.
    async fn transfer(&mut self) -> Result<Duration> {
        let sent = async {
            let mut s = self.control.open_stream(self.peer_b, RAW_PROTOCOL).await?;
            let t = Instant::now();
            s.write_all(&(self.payload.len() as u64).to_be_bytes())
                .await?;
            for chunk in self.payload.chunks(1 << 20) {
                s.write_all(chunk).await?;
            }
            s.flush().await?;
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack).await?;
            let took = t.elapsed();
            let _ = s.close().await;
            Ok::<Duration, anyhow::Error>(took)
        };
        tokio::time::timeout(Duration::from_secs(60), sent)
            .await
            .map_err(|_| anyhow!("a raw transfer did not finish within 60 s"))?
    }
}

impl Drop for RawPair {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resident agents: a child process, so the RSS is one node's alone.

fn rss_kb() -> u64 {
    status_field("VmRSS:")
}

fn status_field(name: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of this process, in clock ticks.
fn cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn resident_child(n: usize) -> Result<()> {
    let rt = runtime()?;
    let author = Author::new()?;
    let mesh = rt.block_on(async {
        let base = rss_kb();
        let mesh = LoopbackMesh::start(1, author.trust.clone(), Limits::default()).await?;
        let node = mesh.nodes()[0].clone();
        let package = author.sign("let m = receive(600000);\nm".to_string())?;
        // One warm-up agent compiles the package.
        let _warm = node
            .launch(package.clone(), None)
            .map_err(anyhow::Error::msg)?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = rss_kb();
        let t = Instant::now();
        let mut ends = Vec::with_capacity(n);
        for _ in 0..n {
            ends.push(
                node.launch(package.clone(), None)
                    .map_err(anyhow::Error::msg)?
                    .1,
            );
            if ends.len() % 256 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let launch = t.elapsed();
        // Settled: every runner has run its slice and sleeps in `receive` once the process
        // stops using CPU (under 5 % over 500 ms).
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = cpu_ticks();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = cpu_ticks();
            if now - last <= 2 || Instant::now() > deadline {
                break;
            }
            last = now;
        }
        let settled = t.elapsed();
        let rss = rss_kb();
        let hwm = status_field("VmHWM:");
        let threads = status_field("Threads:");
        let stored = node.status().expect("the store reads").agents.len();
        let running = ends
            .iter_mut()
            .map(|e| e.try_recv().is_err())
            .filter(|b| *b)
            .count();
        println!(
            "RESIDENT n={n} base_kb={base} before_kb={before} rss_kb={rss} hwm_kb={hwm} \
             threads={threads} stored={stored} unfinished={running} launch_ms={} settle_ms={}",
            launch.as_millis(),
            settled.as_millis()
        );
        std::io::stdout().flush()?;
        Ok::<_, anyhow::Error>(mesh)
    })?;
    drop(mesh);
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

/// The `KEY=value` fields of the report line a child process printed.
struct ChildReport {
    fields: std::collections::HashMap<String, u64>,
}

impl ChildReport {
    fn get(&self, key: &str) -> u64 {
        self.fields.get(key).copied().unwrap_or(0)
    }

    /// The `key=value` fields of a report line (after its prefix word).
    fn parse(line: &str) -> ChildReport {
        let fields = line
            .split_whitespace()
            .skip(1)
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect();
        ChildReport { fields }
    }

    /// MiB above idle: at the peak, and a second after the agent ended.
    fn above_idle(&self) -> (f64, f64) {
        let mib = |k: &str| self.get(k).saturating_sub(self.get("idle_kb")) as f64 / 1024.0;
        (mib("peak_kb"), mib("after_kb"))
    }
}

/// Runs this bench again as a child process with `args`, and reads the first line of its
/// stdout that starts with `prefix`, within `timeout`. The child is killed if it lingers.
fn child_report(args: &[&str], prefix: &str, timeout: Duration) -> Result<ChildReport> {
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let prefix_owned = format!("{prefix} ");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with(&prefix_owned) {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx.recv_timeout(timeout);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let line = line.map_err(|_| anyhow!("the {args:?} child reported nothing"))?;
    Ok(ChildReport::parse(&line))
}

// ---------------------------------------------------------------------------------------------
// Hostile scripts: the RSS one of them takes a node to, in a child process each.

/// Each: what it does, and the script. All run under the default limits.
const HOSTILE: [(&str, &str); 10] = [
    (
        "arrays of 100,000 elements held in an array",
        "let all = []; loop { let a = []; a.pad(100000, 0); all.push(a); }",
    ),
    ("a string doubled", "let s = \"xx\"; loop { s += s; }"),
    ("pushes forever", "let a = []; loop { a.push(a.len()); }"),
    (
        "map entries forever",
        "let m = #{}; let i = 0; loop { m[`k${i}`] = i; i += 1; }",
    ),
    ("one blob of 1 TB", "blob(1 << 40)"),
    (
        "`replace` of the empty string by 1 MB",
        "let s = \"abcdefgh\"; let x = \"\"; x.pad(1000000, \"x\"); loop { s.replace(\"\", x); }",
    ),
    (
        "1 MB blobs held across hops",
        "let all = []; loop { all.push(blob(1000000)); migrate(nodes()[all.len() % 2]); }",
    ),
    ("`a = [a]` repeated", "let a = []; loop { a = [a]; }"),
    (
        "arrays nested until the budget ends it (`a = [a.take()]`)",
        "let a = []; loop { a = [a.take()]; }",
    ),
    (
        "`split` of a 40 MB string into 40 M empty strings",
        "let s = \"\"; s.pad(40000000, \" \"); let p = s.split(\" \"); p.len()",
    ),
];

/// In a child: one node of a two-node mesh, each node in a process of its own, so that each
/// node's RSS is its own. `node-1` (no `peer` given) prints `ADDR <address>`, then its
/// `HOSTILE` line once its stdin closes; `node-0` (given node-1's address) runs hostile script
/// `index` to its end and prints `HOSTILE idle_kb=.. peak_kb=.. after_kb=.. failed=0|1`. Both
/// trust the author whose key has this seed (hex).
fn hostile_child(index: usize, seed: &str, peer: Option<&str>) -> Result<()> {
    let (_, source) = HOSTILE.get(index).context("no such hostile script")?;
    let author = Author::from_seed(seed)?;
    let rt = runtime()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let name = if peer.is_some() { "node-0" } else { "node-1" };
        let mut config = NodeConfig::local(
            name,
            SecretKey::generate(),
            dir.path().to_path_buf(),
            author.trust.clone(),
        );
        if let Some(peer) = peer {
            config.bootstrap = vec![peer.parse()?];
        }
        let node = Node::start(config).await?;
        if peer.is_none() {
            let addr = node.listen_addrs().first().cloned().context("no address")?;
            println!("ADDR {addr}");
            std::io::stdout().flush()?;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while node.peer_names().is_empty() {
            if Instant::now() > deadline {
                bail!("{name} met no peer");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let idle = rss_kb();
        // Peak RSS counted from here (Linux: "5" resets VmHWM).
        std::fs::write("/proc/self/clear_refs", "5")?;
        let failed = if peer.is_some() {
            let package = author.sign(source.to_string())?;
            let (_, end) = node.launch(package, None).map_err(anyhow::Error::msg)?;
            let end = tokio::time::timeout(Duration::from_secs(300), end).await??;
            eprintln!("{end:?}");
            u8::from(matches!(end, AgentEnd::Failed { .. }))
        } else {
            // Until the parent says the agent ended (closes stdin).
            tokio::task::spawn_blocking(|| std::io::stdin().lines().count()).await?;
            0
        };
        let peak = status_field("VmHWM:");
        // What stays once the agent is gone (jemalloc keeps freed memory a while: see
        // `platform::memory`).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_kb();
        println!("HOSTILE idle_kb={idle} peak_kb={peak} after_kb={after} failed={failed}");
        std::io::stdout().flush()?;
        node.stop().await;
        Ok::<_, anyhow::Error>(())
    })?;
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

/// Runs hostile script `index` on two nodes in child processes of their own; the reports of
/// node-0 (where it starts) and node-1.
fn hostile_pair(index: usize) -> Result<(ChildReport, ChildReport)> {
    let seed: String = SecretKey::generate()
        .seed()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let exe = std::env::current_exe()?;
    let mut second = std::process::Command::new(exe)
        .args(["hostile-child", &index.to_string(), &seed])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut lines = std::io::BufReader::new(second.stdout.take().context("child stdout")?).lines();
    let addr = lines
        .next()
        .context("node-1 said nothing")??
        .strip_prefix("ADDR ")
        .context("node-1 gave no address")?
        .to_string();
    let first = child_report(
        &["hostile-child", &index.to_string(), &seed, &addr],
        "HOSTILE",
        Duration::from_secs(330),
    );
    drop(second.stdin.take());
    let line = lines.find_map(|l| l.ok().filter(|l| l.starts_with("HOSTILE ")));
    let _ = second.wait();
    Ok((
        first?,
        ChildReport::parse(&line.context("node-1 reported nothing")?),
    ))
}

// ---------------------------------------------------------------------------------------------
// Components, timed on their own (what a hop is made of)

fn time_median<T>(runs: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(f()?);
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(median(&mut v))
}

fn env() -> HostEnv {
    HostEnv {
        resources: agent_lang::no_resources(),
        here: "node-0".into(),
        home: "node-0".into(),
        nodes: vec!["node-0".into(), "node-1".into()],
        agent_id: "bench".into(),
        hops: 0,
        printer: Arc::new(|_| {}),
    }
}

/// A suspended execution of `source` (at its first `migrate`).
fn suspended(source: &str) -> Result<(Program, Execution)> {
    let program = Program::compile(source, &Limits::default())?;
    let mut exec = Execution::new(&program);
    match exec.resume(&env(), Resume::Start) {
        Outcome::Migrate { .. } => Ok((program, exec)),
        other => bail!("expected a migrate, got {other:?}"),
    }
}

fn record(continuation: Vec<u8>, envelope: Vec<u8>) -> AgentRecord {
    AgentRecord {
        meta: AgentMeta {
            id: AgentId::launched(&SecretKey::generate().public(), &LaunchNonce([5; 16]))
                .to_string(),
            package: [7; 32],
            hop: 1,
            hops: 1,
            operations: 0,
            sent: Default::default(),
            home: "home".into(),
            launcher: None,
            state: AgentState::Ready,
            envelope,
            handover: None,
            tail: Vec::new(),
            nonce: [5; 16],
            certificate: Vec::new(),
        },
        continuation,
    }
}

struct Part {
    name: String,
    micros: f64,
}

fn parts(author: &Author, bulk_bytes: usize) -> Result<Vec<Part>> {
    let mut out = Vec::new();
    let mut add = |name: &str, micros: f64| {
        out.push(Part {
            name: name.to_string(),
            micros,
        })
    };
    // A small continuation: the bouncer suspended at its migrate.
    let (program, exec) = suspended(&bouncer(1000))?;
    let small = exec.encode()?;
    add(
        "encode small continuation",
        time_median(2000, || Ok(exec.encode()?))?,
    );
    add(
        "decode small continuation",
        time_median(2000, || Ok(Execution::decode(&program, &small)?))?,
    );
    add(
        "compile the bouncer package (once per node)",
        time_median(50, || {
            Ok(Program::compile(&bouncer(1000), &Limits::default())?)
        })?,
    );
    // Envelope sign / verify.
    let node_a = SecretKey::generate();
    let node_b = SecretKey::generate();
    let package = author.sign(bouncer(1000))?;
    let continuation_hash = *blake3::hash(&small).as_bytes();
    let fields = HopFields {
        agent_id: AgentId::launched(&node_a.public(), &LaunchNonce::generate()),
        hop: FIRST_HOP,
        package_hash: package.hash(),
        continuation_hash,
        previous: None,
        from: node_a.public(),
        to: node_b.public(),
        time_ms: 0,
    };
    let envelope = HopEnvelope::sign(fields.clone(), &node_a)?;
    let bytes = envelope.encode();
    add(
        "sign hop envelope",
        time_median(1000, || Ok(HopEnvelope::sign(fields.clone(), &node_a)?))?,
    );
    let (a_pub, b_pub, hash) = (node_a.public(), node_b.public(), package.hash());
    add(
        "decode + verify hop envelope",
        time_median(1000, || {
            let e = HopEnvelope::decode(&bytes)?;
            let check = HopCheck::new(&a_pub, &b_pub, &hash, &continuation_hash);
            Ok(verify_hop(e, &check)?)
        })?,
    );
    // Store commits of a small agent record, without and with fsync.
    for (name, durability, runs) in [
        ("store put_agent (small), NoSync", Durability::NoSync, 2000),
        ("store put_agent (small), Fsync", Durability::Fsync, 200),
    ] {
        let dir = tempfile::tempdir()?;
        let store = Store::open(&dir.path().join("s.redb"), durability)?;
        let rec = record(small.clone(), bytes.clone());
        for _ in 0..20 {
            store.batch(|b| b.put_agent(&rec))?;
        }
        add(
            name,
            time_median(runs, || Ok(store.batch(|b| b.put_agent(&rec))?))?,
        );
        add(
            &name.replace("put_agent", "has_seen"),
            time_median(runs, || Ok(store.has_seen(&rec.id, 1, None)?))?,
        );
    }
    // Bulk: what a 100 MB hop does besides moving bytes.
    let blob = bulk_source(bulk_bytes);
    let (program, exec) = suspended(&blob)?;
    let big = exec.encode()?;
    add(
        "bulk: encode continuation",
        time_median(3, || Ok(exec.encode()?))?,
    );
    add(
        "bulk: blake3 of the continuation",
        time_median(3, || Ok(*blake3::hash(&big).as_bytes()))?,
    );
    add(
        "bulk: decode continuation",
        time_median(3, || Ok(Execution::decode(&program, &big)?))?,
    );
    add(
        "bulk: clone continuation (one memcpy)",
        time_median(3, || Ok(big.clone()))?,
    );
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("s.redb"), Durability::NoSync)?;
    let rec = record(big.clone(), bytes.clone());
    add(
        "bulk: store put_agent, NoSync",
        time_median(3, || Ok(store.batch(|b| b.put_agent(&rec))?))?,
    );
    add(
        "bulk: store read agent, NoSync",
        time_median(3, || Ok(store.agent(&rec.id)?))?,
    );
    Ok(out)
}

fn bulk_source(bytes: usize) -> String {
    let per = bytes / 7;
    let mut s = String::new();
    for i in 0..7 {
        let _ = writeln!(s, "let b{i} = blob({per}, {});", 0x41 + i);
    }
    s.push_str("migrate(\"node-1\");\nb0.len() + b1.len() + b2.len() + b3.len() + b4.len() + b5.len() + b6.len()\n");
    s
}

// ---------------------------------------------------------------------------------------------

struct Row {
    what: String,
    measured: String,
    target: String,
    met: Option<bool>,
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "n/a",
    }
}

fn us(micros: f64) -> String {
    if micros >= 10_000.0 {
        format!("{:.1} ms", micros / 1000.0)
    } else if micros < 100.0 {
        format!("{micros:.1} µs")
    } else {
        format!("{micros:.0} µs")
    }
}

fn group(n: f64) -> String {
    let s = format!("{:.0}", n);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("resident-child") {
        let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10_000);
        return resident_child(n);
    }
    if args.first().map(String::as_str) == Some("hostile-child") {
        let index = args
            .get(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(usize::MAX);
        let seed = args.get(2).map_or("", String::as_str);
        return hostile_child(index, seed, args.get(3).map(String::as_str));
    }
    let o = parse_args(&args)?;
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let has = |b: &str| o.benches.iter().any(|x| x == b);
    let author = Author::new()?;
    let rt = runtime()?;
    let mut rows: Vec<Row> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let started = Instant::now();

    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!(
        "bench_mesh: {cpus} CPUs; benches: {}; temp dir {}",
        o.benches.join(" "),
        std::env::temp_dir().display()
    );

    if has("flood") {
        rt.block_on(async {
            let mesh = LoopbackMesh::start(2, author.trust.clone(), Limits::default()).await?;
            let nodes = mesh.nodes().to_vec();
            let mut rx = hop_records(&nodes);
            let target = nodes[1].listen_addrs()[0].clone();
            eprintln!(
                "flood: one agent, {} hops, {} times with and without {FLOODERS} flooders ...",
                o.hops, o.repeats
            );
            let (mut quiet, mut flooded) = (Vec::new(), Vec::new());
            let mut streams = 0;
            for _ in 0..o.repeats {
                quiet.push(pct(
                    &bounce(&nodes, &author, &mut rx, o.hops).await?.micros,
                    50.0,
                ) as f64);
                let flood = Flood::start(&target).await?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let before = flood.opened.load(std::sync::atomic::Ordering::Relaxed);
                let b = bounce(&nodes, &author, &mut rx, o.hops).await?;
                streams += flood.opened.load(std::sync::atomic::Ordering::Relaxed) - before;
                flooded.push(pct(&b.micros, 50.0) as f64);
                drop(flood);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let (q, f) = (median(&mut quiet), median(&mut flooded));
            rows.push(Row {
                what: format!(
                    "hop latency p50 while {FLOODERS} throwaway identities flood the destination \
                     ({} garbage streams/s each, one in eight stalled half-sent) / without them \
                     (medians of {} runs of {} hops, taking turns)",
                    FLOOD_STREAMS_PER_SECOND, o.repeats, o.hops
                ),
                measured: format!(
                    "{:.2} ({} flooded / {} quiet; {streams} flood streams opened while measured)",
                    f / q,
                    us(f),
                    us(q)
                ),
                target: "≤ 2".into(),
                met: Some(f / q <= 2.0),
            });
            drop(mesh);
            Ok::<(), anyhow::Error>(())
        })?;
    }

    if has("latency") || has("concurrent") || has("bulk") {
        rt.block_on(async {
            // Room for the bulk agent's blobs (the default budget is 64 MiB), and the memory
            // its hops free kept for the next (as `[limits] keep_freed_bytes` would); no other
            // agent comes near either.
            let defaults = Limits::default();
            let bulk_memory = 3 * o.bulk_mb as u64 * 1_000_000;
            platform::memory::keep_freed_up_to(4 * bulk_memory);
            let limits = defaults
                .clone()
                .with_max_memory_bytes(defaults.max_memory_bytes.max(bulk_memory));
            let mesh = LoopbackMesh::start(2, author.trust.clone(), limits).await?;
            let nodes = mesh.nodes().to_vec();
            let mut rx = hop_records(&nodes);
            if has("latency") {
                eprintln!(
                    "latency: one agent, {} hops, {} times, NoSync ...",
                    o.hops, o.repeats
                );
                let mut micros = Vec::new();
                let mut rates = Vec::new();
                let mut walls = Vec::new();
                let mut bytes = 0;
                for _ in 0..o.repeats {
                    let b = bounce(&nodes, &author, &mut rx, o.hops).await?;
                    micros.extend(b.micros);
                    rates.push(o.hops as f64 / b.wall.as_secs_f64());
                    walls.push(b.wall.as_secs_f64() * 1e6 / o.hops as f64);
                    bytes = b.bytes;
                }
                micros.sort_unstable();
                let (p50, p99) = (pct(&micros, 50.0), pct(&micros, 99.0));
                rows.push(Row {
                    what: format!(
                        "hop latency, small agent ({bytes} B continuation), 2 nodes on loopback, \
                         signed + verified, store NoSync, p50 / p99 (HopStored: suspension → stored, \
                         {} hops)",
                        micros.len()
                    ),
                    measured: format!(
                        "{} / {} (max {}; wall time per hop incl. restart on arrival: {})",
                        us(p50 as f64),
                        us(p99 as f64),
                        us(*micros.last().unwrap_or(&0) as f64),
                        us(median(&mut walls))
                    ),
                    target: "≤ 300 µs / ≤ 1 ms".into(),
                    met: Some(p50 <= 300 && p99 <= 1000),
                });
                let (low, high) = range(&rates);
                let hps = median(&mut rates);
                rows.push(Row {
                    what: format!(
                        "hops per second, one node pair, one agent bouncing ({} hops; median of \
                         {} runs), NoSync",
                        o.hops, o.repeats
                    ),
                    measured: format!(
                        "{} hops/s (runs {}–{})",
                        group(hps),
                        group(low),
                        group(high)
                    ),
                    target: "≥ 3,000".into(),
                    met: Some(hps >= 3000.0),
                });
            }
            if has("concurrent") {
                eprintln!(
                    "concurrent: {} agents × {} hops, {} times, NoSync ...",
                    o.agents, o.agent_hops, o.repeats
                );
                let package = author.sign(retrying_bouncer(o.agent_hops))?;
                let limit = Duration::from_secs(120);
                // Warm-up: a tenth of the agents.
                let warm: Vec<_> = (0..(o.agents / 10).max(1))
                    .map(|_| run_agent_json(&nodes[0], package.clone(), limit))
                    .collect();
                for r in futures::future::join_all(warm).await {
                    r?;
                }
                let mut rates = Vec::new();
                let mut micros = Vec::new();
                let mut total = 0;
                let mut failed = 0;
                for _ in 0..o.repeats {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    drain(&mut rx);
                    let t = Instant::now();
                    let runs: Vec<_> = (0..o.agents)
                        .map(|_| run_agent_json(&nodes[0], package.clone(), limit))
                        .collect();
                    let mut hops = 0;
                    for r in futures::future::join_all(runs).await {
                        let (made, json) = r?;
                        hops += made;
                        let v: Vec<u64> = serde_json::from_str(&json)?;
                        failed += v.get(1).copied().unwrap_or(0);
                    }
                    rates.push(hops as f64 / t.elapsed().as_secs_f64());
                    total += hops;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    micros.extend(drain(&mut rx).into_iter().map(|r| r.micros));
                }
                micros.sort_unstable();
                let (low, high) = range(&rates);
                let hps = median(&mut rates);
                rows.push(Row {
                    what: format!(
                        "hops per second, {} agents in flight × {} hops each, one node pair, \
                         NoSync (median of {} runs)",
                        o.agents, o.agent_hops, o.repeats
                    ),
                    measured: format!(
                        "{} hops/s (runs {}–{}; per-hop p50 / p99 under load {} / {}; of {} \
                         hop attempts, {} failed and were retried by the agent)",
                        group(hps),
                        group(low),
                        group(high),
                        us(pct(&micros, 50.0) as f64),
                        us(pct(&micros, 99.0) as f64),
                        group((total + failed) as f64),
                        group(failed as f64)
                    ),
                    target: "≥ 10,000".into(),
                    met: Some(hps >= 10_000.0),
                });
            }
            if has("bulk") {
                let bytes = o.bulk_mb * 1_000_000;
                eprintln!(
                    "bulk: {} MB continuation hop and raw transfer, {} runs each ...",
                    o.bulk_mb, o.runs
                );
                let package = author.sign(bulk_source(bytes))?;
                let limit = Duration::from_secs(120);
                let mut hop_us = Vec::new();
                let mut wall_us = Vec::new();
                let mut raw_us = Vec::new();
                let mut size = 0;
                // Hops and raw transfers of the same size take turns (the first of each warms
                // up), so that both see the machine in the same state.
                let mut raw_pair = None;
                for run in 0..=o.runs {
                    drain(&mut rx);
                    let t = Instant::now();
                    run_agent(&nodes[0], package.clone(), limit).await?;
                    let wall = t.elapsed();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let recs = drain(&mut rx);
                    let r = recs.last().context("no hop record for the bulk hop")?;
                    if raw_pair.is_none() {
                        size = r.bytes;
                        raw_pair = Some(RawPair::start(size).await?);
                    }
                    let raw = match raw_pair.as_mut() {
                        Some(pair) => pair.transfer().await?,
                        None => bail!("no raw pair"),
                    };
                    if run > 0 {
                        hop_us.push(r.micros as f64);
                        wall_us.push(wall.as_secs_f64() * 1e6);
                        raw_us.push(raw.as_secs_f64() * 1e6);
                    }
                }
                drop(raw_pair);
                drop(mesh);
                let (hop, raw, wall) = (
                    median(&mut hop_us),
                    median(&mut raw_us),
                    median(&mut wall_us),
                );
                let mib = size as f64 / (1 << 20) as f64;
                let ratio = raw / hop;
                rows.push(Row {
                    what: format!(
                        "{} MB continuation hop / raw libp2p-stream transfer of the same {} bytes \
                         (throughput ratio, medians of {} interleaved runs)",
                        o.bulk_mb,
                        group(size as f64),
                        o.runs
                    ),
                    measured: format!(
                        "{ratio:.2} (hop {} = {:.0} MiB/s; raw {} = {:.0} MiB/s; agent launch → \
                         end {})",
                        us(hop),
                        mib / (hop / 1e6),
                        us(raw),
                        mib / (raw / 1e6),
                        us(wall)
                    ),
                    target: "≥ 0.8".into(),
                    met: Some(ratio >= 0.8),
                });
            } else {
                drop(mesh);
            }
            Ok::<(), anyhow::Error>(())
        })?;
    }

    if has("fsync") {
        let rounds = o.repeats as u64;
        let per_round = (o.hops / rounds).max(2);
        eprintln!(
            "fsync: {rounds} rounds of (fsync probe, one agent of {per_round} hops), Fsync ..."
        );
        // The disk is shared and its speed moves: probes and hops take turns, and the figure
        // is the hops' p50 over the probes' median, each over all rounds.
        let (micros, mut probe, round_medians, wall, hops) = rt.block_on(async {
            let (nodes, dirs) = fsync_pair(&author).await?;
            let mut rx = hop_records(&nodes);
            let mut round_medians = Vec::new();
            let mut probes = |probe: &mut Vec<f64>, round: Vec<f64>| {
                round_medians.push(round[round.len() / 2]);
                probe.extend(round);
            };
            let probe_round = || async {
                tokio::task::spawn_blocking(|| fsync_latency(40))
                    .await
                    .context("the fsync probe panicked")?
            };
            let mut micros = Vec::new();
            let mut probe = Vec::new();
            let mut wall = Duration::ZERO;
            let mut rounds_done = Ok(());
            for _ in 0..rounds {
                probes(&mut probe, probe_round().await?);
                match bounce(&nodes, &author, &mut rx, per_round).await {
                    Ok(b) => {
                        micros.extend(b.micros);
                        wall += b.wall;
                    }
                    Err(e) => {
                        rounds_done = Err(e);
                        break;
                    }
                }
            }
            probes(&mut probe, probe_round().await?);
            for n in &nodes {
                n.shutdown();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(dirs);
            rounds_done.map(|()| (micros, probe, round_medians, wall, rounds * per_round))
        })?;
        let mut micros = micros;
        micros.sort_unstable();
        let (low, high) = range(&round_medians);
        let fsync = median(&mut probe);
        let (p50, p99) = (pct(&micros, 50.0), pct(&micros, 99.0));
        let ratio = p50 as f64 / fsync;
        rows.push(Row {
            what: format!(
                "hop latency with the durable default (fsync on both sides) / this machine's \
                 fsync latency (4 KiB write + fsync), {rounds} rounds of 40 probes then \
                 {per_round} hops, 40 probes after"
            ),
            measured: format!(
                "{ratio:.2} (hop p50 {} / fsync median {} [medians of the rounds {}–{}]; hop p99 {}; \
                 {} hops/s)",
                us(p50 as f64),
                us(fsync),
                us(low),
                us(high),
                us(p99 as f64),
                group(hops as f64 / wall.as_secs_f64())
            ),
            target: "≤ 2.5".into(),
            met: Some(ratio <= 2.5),
        });
    }

    if has("resident") {
        eprintln!(
            "resident: {} agents in receive(600000), child process ...",
            o.resident
        );
        let r = child_report(
            &["resident-child", &o.resident.to_string()],
            "RESIDENT",
            Duration::from_secs(240),
        )?;
        let f = |k: &str| r.get(k);
        let rss = f("rss_kb");
        let per = (rss.saturating_sub(f("before_kb"))) as f64 / o.resident as f64;
        let resident = f("stored") as usize;
        rows.push(Row {
            what: format!(
                "resident agents on one node, each blocked in receive(600000) ({} launched)",
                o.resident
            ),
            measured: format!(
                "{} resident, VmRSS {:.0} MiB (node alone {:.0} MiB; {:.1} KiB per agent; \
                 peak {:.0} MiB; {} threads; launched in {} ms)",
                group(resident as f64),
                rss as f64 / 1024.0,
                f("before_kb") as f64 / 1024.0,
                per,
                f("hwm_kb") as f64 / 1024.0,
                f("threads"),
                f("launch_ms")
            ),
            target: "10,000 within 1 GB".into(),
            met: Some(resident >= 10_000 && rss <= 1 << 20 && f("unfinished") >= 10_000),
        });
    }

    if has("hostile") {
        for (index, (what, _)) in HOSTILE.iter().enumerate() {
            if o.hostile_script.is_some_and(|only| only != index) {
                continue;
            }
            eprintln!("hostile: {what}, child process ...");
            let measured = match hostile_pair(index) {
                Ok((first, second)) => {
                    let ((peak0, after0), (peak1, after1)) =
                        (first.above_idle(), second.above_idle());
                    let ended = if first.get("failed") == 1 {
                        "the agent failed"
                    } else {
                        "the agent finished"
                    };
                    (
                        format!(
                            "node-0 {peak0:.0} MiB, node-1 {peak1:.0} MiB ({ended}; \
                             {after0:.0} / {after1:.0} MiB a second after)"
                        ),
                        Some(peak0.max(peak1) <= 256.0 && first.get("failed") == 1),
                    )
                }
                Err(e) => (format!("the node did not survive: {e}"), Some(false)),
            };
            rows.push(Row {
                what: format!("RSS of each node above idle (peak) while one agent runs: {what}"),
                measured: measured.0,
                target: "≤ 256 MiB, the agent ends with an error".into(),
                met: measured.1,
            });
        }
    }

    if has("parts") {
        eprintln!("parts: component timings ...");
        let ps = parts(&author, o.bulk_mb * 1_000_000)?;
        for p in ps {
            notes.push(format!("| {} | {} |", p.name, us(p.micros)));
        }
    }

    let load = |s: String| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    println!();
    println!(
        "## tern mesh benchmarks ({cpus} CPUs, release build, {:.0} s; load average before {}, \
         after {})",
        started.elapsed().as_secs_f64(),
        load(load_before),
        load(std::fs::read_to_string("/proc/loadavg").unwrap_or_default())
    );
    println!();
    println!("| what | measured | target | |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} |",
            r.what,
            r.measured,
            r.target,
            verdict(r.met)
        );
    }
    if !notes.is_empty() {
        println!();
        println!("### Components (median, measured alone)");
        println!();
        println!("| part | time |");
        println!("|---|---|");
        for n in &notes {
            println!("{n}");
        }
    }
    Ok(())
}
