//! The `tern node` configuration file (TOML), validated into a [`NodeConfig`].
//!
//! ```toml
//! name = "alpha"
//! listen = ["/ip4/127.0.0.1/tcp/0"]
//! bootstrap = ["/ip4/127.0.0.1/tcp/4001/p2p/12D3KooW..."]
//! key = "alpha.pem"          # created if missing
//! data_dir = "alpha-data"
//! mdns = false
//! durability = "fsync"       # or "none"
//! [trust]
//! authors = "any"            # or a list of public keys
//! accept_from = "any"        # or a list of peer ids / public keys
//! operators = ["ed25519:..."] # who may launch, send and ask (tern --key); none if omitted
//! [peers]                    # node names pinned to keys: no other peer takes them
//! beta = "ed25519:..."
//! [limits]
//! max_operations = 100000000        # per slice (from a resume to the next suspension)
//! max_total_operations = 10000000000  # in the agent's whole life, every slice on every node
//! max_memory_bytes = 50331648         # all of one agent's values together, on this node
//! max_messages_sent = 10000000        # in the agent's whole life, every node together
//! max_message_bytes_sent = 1073741824 # likewise, bytes of encoded messages
//! max_agents = 100000                 # stored on this node at once
//! max_store_bytes = 17179869184       # agents' state in the store, all agents together
//! max_message_bytes = 1048576  # and max_queued_messages, max_queued_bytes (per agent)
//! max_messages_per_peer_per_second = 1000
//! upload_mbit = 20                    # pace outgoing protocol bytes to 20 Mbit/s (no cap if omitted)
//! keep_freed_bytes = 67108864         # memory freed by large hops kept for the next, above idle
//! [resources.shard]          # what agents reach with resource("shard") (see `crate::resources`)
//! type = "dataset"           # dataset | table | value
//! path = "shards/0"          # a file or a directory of files, relative to this file
//! mobility = "fixed"         # free | fixed-transferable | fixed (the default)
//! [resources.counts]
//! type = "table"             # kept in the node's store
//! [resources.settings]
//! type = "value"
//! value = { depth = 3 }      # any TOML value
//! ```
//! Relative paths are relative to the file's directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use libp2p::Multiaddr;
use serde::Deserialize;

use crate::node::NodeConfig;
use crate::store::Durability;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: String,
    #[serde(default = "default_listen")]
    listen: Vec<String>,
    #[serde(default)]
    bootstrap: Vec<String>,
    key: PathBuf,
    data_dir: PathBuf,
    #[serde(default)]
    mdns: bool,
    #[serde(default = "default_durability")]
    durability: String,
    #[serde(default)]
    trust: Option<toml::Value>,
    /// Node names pinned to keys.
    #[serde(default)]
    peers: std::collections::HashMap<String, String>,
    #[serde(default)]
    limits: LimitsConfig,
    /// What the node offers agents, one table per resource.
    #[serde(default)]
    resources: toml::Table,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsConfig {
    max_operations: Option<u64>,
    max_total_operations: Option<u64>,
    max_memory_bytes: Option<u64>,
    max_messages_sent: Option<u64>,
    max_message_bytes_sent: Option<u64>,
    max_agents: Option<u64>,
    max_store_bytes: Option<u64>,
    max_call_depth: Option<usize>,
    max_string_size: Option<usize>,
    max_array_size: Option<usize>,
    max_map_size: Option<usize>,
    max_continuation_bytes: Option<usize>,
    max_message_bytes: Option<u64>,
    max_queued_messages: Option<u64>,
    max_queued_bytes: Option<u64>,
    max_messages_per_peer_per_second: Option<u32>,
    upload_mbit: Option<f64>,
    keep_freed_bytes: Option<u64>,
}

fn default_listen() -> Vec<String> {
    vec!["/ip4/0.0.0.0/tcp/0".into()]
}

fn default_durability() -> String {
    "fsync".into()
}

/// Reads and validates a node configuration file; creates the key file if it is missing.
///
/// # Errors
///
/// The file cannot be read, is not valid TOML, or a field is invalid (named in the error).
pub fn load(path: &Path) -> Result<NodeConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: FileConfig = toml::from_str(&text)
        .with_context(|| format!("{} is not a valid node configuration", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    if !discovery::is_valid_name(&file.name) {
        bail!(
            "{}: name '{}' must be 1 to 64 of A-Z a-z 0-9 . _ -",
            path.display(),
            file.name
        );
    }
    let parse_addrs = |field: &str, v: &[String]| -> Result<Vec<Multiaddr>> {
        v.iter()
            .map(|a| {
                a.parse().with_context(|| {
                    format!("{}: {field}: '{a}' is not a multiaddr", path.display())
                })
            })
            .collect()
    };
    let key_path = resolve(&file.key);
    let key = if key_path.exists() {
        crate::package_files::read_key(&key_path)?
    } else {
        crate::package_files::write_new_key(&key_path, false)?
    };
    let durability = match file.durability.as_str() {
        "fsync" => Durability::Fsync,
        "none" => Durability::NoSync,
        other => bail!(
            "{}: durability '{other}' must be \"fsync\" or \"none\"",
            path.display()
        ),
    };
    let trust = match file.trust {
        Some(v) => v
            .try_into()
            .with_context(|| format!("{}: [trust]", path.display()))?,
        None => security::TrustPolicy::default(),
    };
    let mut limits = agent_lang::Limits::default();
    let l = &file.limits;
    // Rhai reads a limit of 0 as "no limit": refused rather than taken that way.
    for (name, value) in [
        ("max_operations", l.max_operations),
        ("max_total_operations", l.max_total_operations),
        ("max_memory_bytes", l.max_memory_bytes),
        ("max_messages_sent", l.max_messages_sent),
        ("max_message_bytes_sent", l.max_message_bytes_sent),
        ("max_call_depth", l.max_call_depth.map(|v| v as u64)),
        ("max_string_size", l.max_string_size.map(|v| v as u64)),
        ("max_array_size", l.max_array_size.map(|v| v as u64)),
        ("max_map_size", l.max_map_size.map(|v| v as u64)),
        (
            "max_continuation_bytes",
            l.max_continuation_bytes.map(|v| v as u64),
        ),
        ("max_agents", l.max_agents),
        ("max_store_bytes", l.max_store_bytes),
    ] {
        if value == Some(0) {
            bail!("{}: [limits] {name} must be at least 1", path.display());
        }
    }
    if let Some(v) = l.max_operations {
        limits = limits.with_max_operations(v);
    }
    if let Some(v) = l.max_total_operations {
        limits = limits.with_max_total_operations(v);
    }
    if let Some(v) = l.max_memory_bytes {
        limits = limits.with_max_memory_bytes(v);
    }
    if let Some(v) = l.max_messages_sent {
        limits = limits.with_max_messages_sent(v);
    }
    if let Some(v) = l.max_message_bytes_sent {
        limits = limits.with_max_message_bytes_sent(v);
    }
    if let Some(v) = l.max_call_depth {
        limits = limits.with_max_call_depth(v);
    }
    if let Some(v) = l.max_string_size {
        limits = limits.with_max_string_size(v);
    }
    if let Some(v) = l.max_array_size {
        limits = limits.with_max_array_size(v);
    }
    if let Some(v) = l.max_map_size {
        limits = limits.with_max_map_size(v);
    }
    if let Some(v) = l.max_continuation_bytes {
        limits = limits.with_max_continuation_bytes(v);
    }
    let defaults = crate::node::MailboxLimits::default();
    let mailbox = crate::node::MailboxLimits {
        max_message_bytes: l.max_message_bytes.unwrap_or(defaults.max_message_bytes),
        max_queued_messages: l
            .max_queued_messages
            .unwrap_or(defaults.max_queued_messages),
        max_queued_bytes: l.max_queued_bytes.unwrap_or(defaults.max_queued_bytes),
        max_messages_per_peer_per_second: match l.max_messages_per_peer_per_second {
            None => defaults.max_messages_per_peer_per_second,
            Some(v) => std::num::NonZeroU32::new(v).with_context(|| {
                format!(
                    "{}: [limits] max_messages_per_peer_per_second must be at least 1",
                    path.display()
                )
            })?,
        },
    };
    mailbox
        .check()
        .map_err(|e| anyhow::anyhow!("{}: [limits] {e}", path.display()))?;
    let mut pinned_names = std::collections::HashMap::new();
    for (name, key) in &file.peers {
        if !discovery::is_valid_name(name) {
            bail!("{}: [peers] '{name}' is not a node name", path.display());
        }
        let key = key
            .parse::<security::PublicKey>()
            .map_err(|e| anyhow::anyhow!("{}: [peers] {name} = '{key}': {e}", path.display()))?;
        pinned_names.insert(name.clone(), key);
    }
    Ok(NodeConfig {
        name: file.name,
        listen: parse_addrs("listen", &file.listen)?,
        bootstrap: parse_addrs("bootstrap", &file.bootstrap)?,
        key,
        data_dir: resolve(&file.data_dir),
        mdns: file.mdns,
        durability,
        trust,
        limits,
        mailbox,
        max_agents: l.max_agents.unwrap_or(crate::node::DEFAULT_MAX_AGENTS),
        resources: crate::resources::NodeResources::from_toml(&file.resources, base)
            .map_err(|e| anyhow::anyhow!("{}: [resources] {e}", path.display()))?,
        upload_mbit: l
            .upload_mbit
            .map(crate::node::check_upload_mbit)
            .transpose()
            .map_err(|e| anyhow::anyhow!("{}: [limits] {e}", path.display()))?,
        max_store_bytes: l
            .max_store_bytes
            .unwrap_or(crate::node::DEFAULT_MAX_STORE_BYTES),
        keep_freed_bytes: l
            .keep_freed_bytes
            .unwrap_or(crate::memory::DEFAULT_KEEP_FREED),
        pinned_names,
        store: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(limits: &str) -> Result<NodeConfig> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            format!(
                "name = \"alpha\"\nkey = \"alpha.pem\"\ndata_dir = \"data\"\n[limits]\n{limits}"
            ),
        )?;
        load(&path)
    }

    #[test]
    fn resources_are_read_relative_to_the_file_and_errors_name_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("words.txt"), "one\ntwo\n").unwrap();
        let path = dir.path().join("node.toml");
        let head = "name = \"alpha\"\nkey = \"alpha.pem\"\ndata_dir = \"data\"\n";
        std::fs::write(
            &path,
            format!(
                "{head}[resources.words]\ntype = \"dataset\"\npath = \"words.txt\"\n\
                 [resources.counts]\ntype = \"table\"\nmobility = \"free\"\n"
            ),
        )
        .unwrap();
        let config = load(&path).unwrap();
        let listed: Vec<_> = config.resources.list().collect();
        assert_eq!(
            listed,
            [
                ("counts", agent_lang::ResourceKind::Table),
                ("words", agent_lang::ResourceKind::Dataset)
            ]
        );
        std::fs::write(
            &path,
            format!("{head}[resources.words]\ntype = \"dataset\"\npath = \"gone.txt\"\n"),
        )
        .unwrap();
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(
            err.contains("[resources] resource 'words'") && err.contains("gone.txt"),
            "{err}"
        );
    }

    #[test]
    fn mailbox_limits_are_read_and_the_rest_default() {
        let config = load_text(
            "max_queued_messages = 10\nmax_operations = 5\nmax_total_operations = 50\n\
                 max_memory_bytes = 4096\nmax_messages_sent = 7\nmax_message_bytes_sent = 70\n\
                 max_store_bytes = 1000000\nupload_mbit = 20.5\nkeep_freed_bytes = 0",
        )
        .unwrap();
        assert_eq!(config.mailbox.max_queued_messages, 10);
        assert_eq!(
            config.mailbox.max_message_bytes,
            crate::node::MailboxLimits::default().max_message_bytes
        );
        assert_eq!(config.limits.max_operations, 5);
        assert_eq!(config.limits.max_total_operations, 50);
        assert_eq!(config.limits.max_memory_bytes, 4096);
        assert_eq!(config.limits.max_messages_sent, 7);
        assert_eq!(config.limits.max_message_bytes_sent, 70);
        assert_eq!(config.max_store_bytes, 1_000_000);
        assert_eq!(config.upload_mbit, Some(20.5));
        assert_eq!(config.keep_freed_bytes, 0);
        let err = load_text("upload_mbit = 0").unwrap_err();
        assert!(
            format!("{err:#}").contains("[limits] upload_mbit must be a positive number"),
            "{err:#}"
        );
        assert_eq!(config.max_agents, crate::node::DEFAULT_MAX_AGENTS);
    }

    #[test]
    fn a_queue_too_large_to_travel_is_refused_naming_the_field() {
        let err = load_text("max_queued_bytes = 20000000").unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("max_queued_bytes = 20000000"), "{text}");
        let err = load_text("max_queued_messages = 5000").unwrap_err();
        assert!(
            format!("{err:#}").contains("max_queued_messages"),
            "{err:#}"
        );
        let err = load_text("max_message_bytes = 9000000").unwrap_err();
        assert!(format!("{err:#}").contains("max_message_bytes"), "{err:#}");
        let err = load_text("max_operations = 0").unwrap_err();
        assert!(
            format!("{err:#}").contains("max_operations must be at least 1"),
            "{err:#}"
        );
        let err = load_text("max_messages_per_peer_per_second = 0").unwrap_err();
        assert!(
            format!("{err:#}").contains("max_messages_per_peer_per_second must be at least 1"),
            "{err:#}"
        );
        let err = load_text("max_mesage_bytes = 1").unwrap_err();
        assert!(format!("{err:#}").contains("max_mesage_bytes"), "{err:#}");
    }
}
