//! `tern pack`: a script compiled and signed by its author into a package file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use platform::package_files;

#[derive(clap::Args, Debug)]
pub(crate) struct PackArgs {
    /// The agent's Rhai script.
    script: PathBuf,
    /// The author's secret key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Package name (default: the script's file stem).
    #[arg(long)]
    name: Option<String>,
    /// Version text.
    #[arg(long, default_value = "0.1.0")]
    version: String,
    /// A resource binding, NAME=POLICY or NAME=POLICY/BINDING (repeatable): POLICY one of copy,
    /// rebind, remote, move, copy-on-reference; BINDING one of by-identifier, by-value, by-type
    /// (by default: by-type for rebind, by-value for the copies, by-identifier otherwise).
    #[arg(long = "resource", value_name = "NAME=POLICY[/BINDING]")]
    resources: Vec<String>,
    /// A capability the agent asks for (repeatable).
    #[arg(long = "capability")]
    capabilities: Vec<String>,
    /// Operations per run slice the agent asks for.
    #[arg(long)]
    max_operations: Option<u64>,
    /// Operations in the agent's whole life it asks for.
    #[arg(long)]
    max_total_operations: Option<u64>,
    /// Bytes all the agent's values may hold, on the node it is on.
    #[arg(long)]
    max_memory_bytes: Option<u64>,
    /// Messages the agent may send in its whole life.
    #[arg(long)]
    max_messages_sent: Option<u64>,
    /// Bytes of messages the agent may send in its whole life.
    #[arg(long)]
    max_message_bytes_sent: Option<u64>,
    /// Where to write the package (default: the script path with extension .tern).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs `tern pack`.
pub(crate) fn pack(args: PackArgs) -> Result<()> {
    let key = package_files::read_key(&args.key)?;
    let source = std::fs::read_to_string(&args.script)
        .with_context(|| format!("cannot read {}", args.script.display()))?;
    let resources = resource_decls(&args.resources)?;
    let name = match args.name {
        Some(n) => n,
        None => args
            .script
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "agent".into()),
    };
    let spec = package_files::PackSpec {
        name,
        version: args.version,
        resources,
        capabilities: args.capabilities,
        limits: security::PackageLimits {
            max_operations: args.max_operations,
            max_total_operations: args.max_total_operations,
            max_memory_bytes: args.max_memory_bytes,
            max_messages_sent: args.max_messages_sent,
            max_message_bytes_sent: args.max_message_bytes_sent,
            ..Default::default()
        },
    };
    let package = package_files::pack(source, spec, &key, now_ms())
        .with_context(|| format!("cannot pack {}", args.script.display()))?;
    let out = args
        .out
        .unwrap_or_else(|| args.script.with_extension("tern"));
    std::fs::write(&out, package.to_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!("wrote {}", out.display());
    println!("hash: {}", package.hash());
    Ok(())
}

/// The creation time a package is signed with: now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The bindings `--resource NAME=POLICY[/BINDING]` flags declare (`tern pack` and `tern run`).
pub(crate) fn resource_decls(flags: &[String]) -> Result<Vec<security::ResourceDecl>> {
    let mut names = std::collections::HashSet::new();
    flags
        .iter()
        .map(|r| {
            let (name, policy) = r
                .split_once('=')
                .with_context(|| format!("--resource {r}: expected NAME=POLICY"))?;
            if !agent_lang::is_valid_resource_name(name) {
                anyhow::bail!("--resource {r}: a resource name is 1 to 64 of A-Z a-z 0-9 . _ -");
            }
            if !names.insert(name) {
                anyhow::bail!("--resource {r}: '{name}' is declared twice");
            }
            security::ResourceDecl::from_text(name, policy)
                .map_err(|e| anyhow::anyhow!("--resource {r}: {e}"))
        })
        .collect()
}
