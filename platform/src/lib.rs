//! The tern platform: nodes that run agents and move them between each other, and the `tern`
//! command line.
//!
//! - [`package_files`] reads and writes key and package files for the CLI.
//! - [`mesh`] is the embedded mesh `tern run` uses: N named nodes inside one process, each on
//!   its own thread with its own compiled copy of the program. Nothing is shared between nodes
//!   but bytes: every hop encodes the agent's continuation at the source and decodes it into a
//!   fresh executor at the destination.
//!
//! The networked node (libp2p transport, durable store, exactly-once hops) builds on the same
//! [`mesh::NodeEvent`] vocabulary and replaces the in-process channels.

pub mod mesh;
pub mod package_files;
