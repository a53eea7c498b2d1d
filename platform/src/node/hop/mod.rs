//! The hop protocol (`/tern/hop/10`), exactly once: the source's side ([`depart`]), the
//! destination's ([`arrive`]), the destination's record of receipts in progress ([`gate`]),
//! and the settling of hops whose outcome a crash or a lost answer left unknown ([`recover`]).

mod arrive;
mod depart;
mod gate;
mod recover;

pub(super) use arrive::handle_hop;
pub(super) use depart::{hop, release_large_checkpoint, Departures, HopResult};
pub(super) use gate::ArrivalGate;
pub(super) use recover::{
    ask_hop_decision, departed_by, handover_key, hop_committed, hop_held, recover_departure,
};
