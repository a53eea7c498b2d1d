//! Every protocol stream carries frames (a 4-byte length, then CBOR) that a peer, an operator's
//! client or any node answering a request writes: hop offers, decisions and replies, control
//! and client requests and replies, package requests and replies, resource requests and replies;
//! and the tables and values that move with an agent, which follow its continuation
//! (`MovedResources`, read here as a frame body: the node decodes them the same way).
//! `read_frame` must take any bytes to a message or an error, with the limits the node reads
//! them under (`MAX_FRAME`, and 1024 bytes for a package request), never allocating for a length
//! the stream only announces, and never building more than `MAX_CARRIED_MESSAGES` carried
//! messages or a custody tail over its bound. A stream is read frame after frame, as the node reads a reused stream.
//!
//! The first input byte picks the message type; the rest is the stream. A message read must
//! encode again (`push_frame`) into a frame that reads back and encodes to the same bytes.
#![no_main]

use std::sync::OnceLock;

use futures::io::Cursor;
use libfuzzer_sys::fuzz_target;
use platform::wire::{
    push_frame, read_frame, ClientRequest, ControlReply, ControlRequest, HopDecision, HopHandover,
    HopOffer, HopReply, MovedResources, PackageReply, PackageRequest, ResourceReply,
    ResourceRequest, MAX_FRAME, MAX_MOVED_BYTES,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The frames of one stream read in one run, at most.
const FRAMES: usize = 8;

/// `read_frame` runs its reads under `tokio::time::timeout`, so it needs a runtime with a timer
/// (nothing here ever waits on it: the stream is in memory).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}

fn frames<T: Serialize + DeserializeOwned>(what: &str, stream: &[u8], max: usize) {
    let rt = runtime();
    let mut r = Cursor::new(stream);
    for _ in 0..FRAMES {
        let read = tern_fuzz::bounded(what, stream.len(), 128, || {
            rt.block_on(read_frame::<_, T>(&mut r, max))
        });
        let Ok(message) = read else { return };
        let mut once = Vec::new();
        push_frame(&mut once, &message).expect("a message read encodes");
        let again: T = rt
            .block_on(read_frame(&mut Cursor::new(&once[..]), usize::MAX))
            .expect("a re-encoded message reads back");
        let mut twice = Vec::new();
        push_frame(&mut twice, &again).expect("a message read encodes");
        assert_eq!(once, twice, "{what}: encoding is not stable");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, stream)) = data.split_first() else {
        return;
    };
    match which % 12 {
        0 => frames::<HopOffer>("HopOffer", stream, MAX_FRAME),
        1 => frames::<HopReply>("HopReply", stream, MAX_FRAME),
        2 => frames::<HopDecision>("HopDecision", stream, MAX_FRAME),
        3 => frames::<ControlRequest>("ControlRequest", stream, MAX_FRAME),
        4 => frames::<ControlReply>("ControlReply", stream, MAX_FRAME),
        5 => frames::<ClientRequest>("ClientRequest", stream, MAX_FRAME),
        6 => frames::<PackageRequest>("PackageRequest", stream, 1024),
        7 => frames::<PackageReply>("PackageReply", stream, MAX_FRAME),
        8 => frames::<HopHandover>("HopHandover", stream, MAX_FRAME),
        9 => frames::<ResourceRequest>("ResourceRequest", stream, MAX_FRAME),
        10 => frames::<MovedResources>("MovedResources", stream, MAX_MOVED_BYTES),
        _ => frames::<ResourceReply>("ResourceReply", stream, MAX_FRAME),
    }
});
