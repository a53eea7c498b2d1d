//! Fault injection for the crash tests: the points of a hop or a delivery where a test may ask a
//! node to die (`TERN_FAULT`), so that recovery is tested at every step, or to be slow, so that
//! a race that is rare on a fast machine happens every time.

/// Where a test wants a node to die (never set outside tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FaultPoint {
    /// Source: once its departure record is durable (the offer is out), before its Commit.
    SourceAfterLeaving,
    /// Source: once its departure record is durable, before anything of the hop was sent.
    SourceBeforeOffer,
    /// Source: after the destination acknowledged, before deleting its copy.
    SourceAfterAck,
    /// Destination: after storing the agent as arriving, before applying the source's decision.
    DestinationAfterStore,
    /// Any node: after an agent took a message off its queue in `receive`.
    AfterReceive,
    /// Any node: after it queued a message for an agent it holds, before answering the sender.
    AfterQueue,
    /// Source: not a death but a delay of a second once the destination acknowledged, before
    /// deleting its copy, so that an agent that goes straight back comes back first.
    SlowDeparture,
    /// Source: as [`FaultPoint::SlowDeparture`], then a death once the departure is complete,
    /// before a message queued meanwhile is forwarded.
    SourceAfterDeparture,
}

/// The fault point this node dies at, if any.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Faults(Option<FaultPoint>);

impl Faults {
    /// The fault point `TERN_FAULT` names (only the end-to-end crash tests set it).
    pub(super) fn from_env() -> Faults {
        let point = match std::env::var("TERN_FAULT").ok().as_deref() {
            Some("source-after-leaving") => Some(FaultPoint::SourceAfterLeaving),
            Some("source-before-offer") => Some(FaultPoint::SourceBeforeOffer),
            Some("source-after-ack") => Some(FaultPoint::SourceAfterAck),
            Some("destination-after-store") => Some(FaultPoint::DestinationAfterStore),
            Some("after-receive") => Some(FaultPoint::AfterReceive),
            Some("after-queue") => Some(FaultPoint::AfterQueue),
            Some("slow-departure") => Some(FaultPoint::SlowDeparture),
            Some("source-after-departure") => Some(FaultPoint::SourceAfterDeparture),
            _ => None,
        };
        Faults(point)
    }

    /// Whether the node dies at `point`.
    pub(super) fn at(self, point: FaultPoint) -> bool {
        self.0 == Some(point)
    }

    /// Ends the process here if the node dies at `point`.
    pub(super) fn die_at(self, point: FaultPoint) {
        if self.at(point) {
            tracing::error!("fault injection: dying at {point:?}");
            std::process::exit(86);
        }
    }
}
