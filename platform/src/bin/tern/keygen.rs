//! `tern keygen`: a new ed25519 key (for an author or a node) in a PKCS#8 PEM file, and its
//! public key and peer id.

use std::path::PathBuf;

use anyhow::Result;
use platform::package_files;

#[derive(clap::Args, Debug)]
pub(crate) struct KeygenArgs {
    /// Where to write the secret key (mode 0600).
    #[arg(long)]
    out: PathBuf,
    /// Overwrite an existing file.
    #[arg(long)]
    force: bool,
    /// Print the public key and peer id as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `tern keygen`.
pub(crate) fn keygen(args: KeygenArgs) -> Result<()> {
    let key = package_files::write_new_key(&args.out, args.force)?;
    let public = key.public();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"public_key": public.to_string(), "peer_id": public.peer_id_string(), "file": args.out})
        );
    } else {
        println!("wrote {}", args.out.display());
        println!("public key: {public}");
        println!("peer id:    {}", public.peer_id_string());
    }
    Ok(())
}
