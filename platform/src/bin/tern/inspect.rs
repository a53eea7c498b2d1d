//! `tern inspect`: a package's manifest, author and hash, once its signature has verified.

use std::path::PathBuf;

use anyhow::Result;
use platform::package_files;

#[derive(clap::Args, Debug)]
pub(crate) struct InspectArgs {
    /// The package file.
    file: PathBuf,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `tern inspect`.
pub(crate) fn inspect(args: InspectArgs) -> Result<()> {
    let package = package_files::read_package(&args.file)?;
    let m = package.manifest();
    if args.json {
        let resources: Vec<_> = m
            .resources
            .iter()
            .map(|r| {
                serde_json::json!({"name": r.name, "policy": r.policy.as_str(),
                    "binding": r.binding().as_str()})
            })
            .collect();
        let limits: serde_json::Map<String, serde_json::Value> = m
            .limits
            .entries()
            .iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v.into())))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "name": m.name, "version": m.version, "author": m.author.to_string(), "created_ms": m.created_ms,
                "hash": package.hash().to_string(), "signature": "valid", "resources": resources,
                "capabilities": m.capabilities, "limits": limits, "source_bytes": package.source().len(),
            })
        );
    } else {
        println!("package:      {} {}", m.name, m.version);
        println!("hash:         {}", package.hash());
        println!("author:       {}", m.author);
        println!("signature:    valid");
        println!("created (ms): {}", m.created_ms);
        for r in &m.resources {
            println!("resource:     {} ({}, {})", r.name, r.policy, r.binding());
        }
        for c in &m.capabilities {
            println!("capability:   {c}");
        }
        for (k, v) in m.limits.entries() {
            if let Some(v) = v {
                println!("limit:        {k} = {v}");
            }
        }
        println!("source:       {} bytes", package.source().len());
    }
    Ok(())
}
