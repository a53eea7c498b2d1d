//! A raw libp2p peer that speaks tern's wire protocols by hand, for hostile-peer tests: it can
//! open hop streams and write anything on them, serves the packages it is given, and records
//! the agent ends nodes report to it (when it names itself as an agent's home), and answers
//! whether the hops it sent committed ([`RawPeer::record_departure`]). Hops offered to it are
//! refused, or left unanswered ([`RawPeer::stall_hops`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::{Multiaddr, PeerId};
use platform::wire::{
    read_frame, write_frame, AgentEnd, ClientRequest, ControlRefusal, ControlReply, ControlRequest,
    HandoverKey, HopHandover, HopOffer, HopRefusal, HopReply, PackageReply, PackageRequest,
    CLIENT_PROTOCOL, CONTROL_PROTOCOL, HOP_PROTOCOL, MAX_FRAME, PACKAGE_PROTOCOL,
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
    /// Hashes of the envelopes the node asked about with `ControlRequest::Departed`.
    asked_departed: Arc<Mutex<Vec<[u8; 32]>>>,
    offers: Arc<Mutex<Vec<HopOffer>>>,
    /// Whether hops offered to it are left unanswered.
    stalling: Arc<AtomicBool>,
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
                    let Ok(req) = read_frame::<_, PackageRequest>(&mut stream, 1024).await else {
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
        let asked_departed: Arc<Mutex<Vec<[u8; 32]>>> = Arc::default();
        let asked = asked_departed.clone();
        let signer = key.clone();
        tasks.push(tokio::spawn(async move {
            while let Some((_, mut stream)) = control_streams.next().await {
                let (ends, recorded, signer, asked) = (
                    ends.clone(),
                    recorded.clone(),
                    signer.clone(),
                    asked.clone(),
                );
                tokio::spawn(async move {
                    let reply = match read_frame::<_, ControlRequest>(&mut stream, MAX_FRAME).await
                    {
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
                            let hash = *blake3::hash(&envelope).as_bytes();
                            asked.lock().unwrap_or_else(|e| e.into_inner()).push(hash);
                            let departed = recorded
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .contains(&hash);
                            ControlReply::HandedOver(
                                HopEnvelope::decode(&envelope)
                                    .ok()
                                    .filter(|_| departed)
                                    .map(|e| handover_of(&e, &signer)),
                            )
                        }
                        _ => ControlReply::Refused(ControlRefusal::UnexpectedReply(
                            "raw peer".into(),
                        )),
                    };
                    let _ = write_frame(&mut stream, &reply).await;
                });
            }
        }));
        // Hops offered to the raw peer are kept and refused (or, stalling, left unanswered on
        // streams kept open until the peer is dropped).
        let offers: Arc<Mutex<Vec<HopOffer>>> = Arc::default();
        let offered = offers.clone();
        let stalling = Arc::new(AtomicBool::new(false));
        let stall = stalling.clone();
        tasks.push(tokio::spawn(async move {
            let mut stalled = Vec::new();
            while let Some((_, mut stream)) = hop_streams.next().await {
                if let Ok(offer) = read_frame::<_, HopOffer>(&mut stream, MAX_FRAME).await {
                    offered
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(offer);
                    if stall.load(Ordering::Relaxed) {
                        stalled.push(stream);
                        continue;
                    }
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
            asked_departed,
            offers,
            stalling,
            tasks,
        }
    }

    /// From now on, hops offered to this peer are left unanswered: their agents stay leaving
    /// the node that offered them.
    pub fn stall_hops(&self) {
        self.stalling.store(true, Ordering::Relaxed);
    }

    /// The hops the node offered to this peer (each was refused).
    pub fn offers(&self) -> Vec<HopOffer> {
        self.offers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The hashes of the envelopes the node asked this peer about with
    /// `ControlRequest::Departed` (whether it handed an agent over by them), in order.
    pub fn asked_departed(&self) -> Vec<[u8; 32]> {
        self.asked_departed
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

/// The handover key `key` gives for the hop by `envelope`: the real one if `key` signed the
/// envelope, else the best a peer without the signer's key can make (a keyed hash of its own).
pub fn handover_of(envelope: &HopEnvelope, key: &SecretKey) -> HandoverKey {
    HandoverKey(
        envelope
            .handover_key(key)
            .unwrap_or_else(|| *blake3::keyed_hash(&key.seed(), &envelope.encode()).as_bytes()),
    )
}

/// The handover of the hop `offer` by `key` (its sender), as a source sends it after
/// `Stored`.
pub fn handover_after(offer: &HopOffer, key: &SecretKey) -> HopHandover {
    let envelope = HopEnvelope::decode(&offer.envelope).expect("the offer's envelope");
    HopHandover(handover_of(&envelope, key))
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
        tables_len: 0,
        custody: Vec::new(),
    };
    (offer, continuation)
}
