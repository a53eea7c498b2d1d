//! The tern platform: nodes that run agents and move them between each other, and the `tern`
//! command line.
//!
//! - [`package_files`] reads and writes key and package files for the CLI.
//! - [`node`] is a tern node on libp2p (TCP + noise + yamux; identify, ping, Kademlia, optional
//!   mDNS): the exactly-once hop protocol, anonymous package pull, the control protocol, and the
//!   agents it runs on the threads of [`slices`]. [`wire`] holds the protocols' names, messages and
//!   framing; [`client`] is the CLI's side of the control protocol; [`config`] reads
//!   `tern node`'s TOML file.
//! - [`loopback`] is the mesh `tern run` uses: N real nodes on 127.0.0.1 inside one process.
//!   Nothing is shared between nodes but bytes: every hop encodes the agent's continuation at the
//!   source and decodes it into a fresh executor at the destination.
//! - [`memory`] says how the binaries allocate (jemalloc, configured for large hops).
//! - [`resources`]: what a node offers agents (datasets, tables, values) and how their handles
//!   reach it.
//! - [`slices`] runs agent slices: one thread per core, extra threads for the overflow, each with
//!   the stack the agent's memory budget needs.
//! - [`verifier`] checks the signatures of hops that arrive together in batches.
//! - [`store`] is the node's crash-safe embedded database (redb): agents, packages, hops seen,
//!   forwarding pointers, locations, message queues and results.
//!
pub mod client;
pub mod config;
pub mod loopback;
pub mod memory;
pub mod node;
pub mod package_files;
pub mod resources;
pub mod slices;
pub mod store;
pub mod verifier;
pub mod wire;
