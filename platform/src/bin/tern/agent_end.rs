//! How the CLI reports the end of an agent: its result on stdout, or its failure (node, line and
//! column, reason) on stderr with exit code 1, and the messages it never received.

use anyhow::Result;
use platform::wire::AgentEnd;

/// An agent that ran but did not succeed: already reported on stderr; exit code 1.
#[derive(Debug, thiserror::Error)]
#[error("agent failed")]
pub(crate) struct AgentFailed;

/// Prints an agent's end as `tern launch` and `tern result` do: the result JSON on stdout, or the
/// error on stderr and exit code 1.
pub(crate) fn print_end(agent: &str, end: AgentEnd) -> Result<()> {
    note_unread(agent, &end);
    match end {
        AgentEnd::Finished { json, .. } => {
            println!("{json}");
            Ok(())
        }
        AgentEnd::Failed {
            error,
            node,
            position,
            ..
        } => Err(failed(
            false,
            &node,
            &format!("agent {agent}"),
            &error,
            position,
        )),
    }
}

/// Says on stderr when messages delivered to the agent were never received by it.
pub(crate) fn note_unread(agent: &str, end: &AgentEnd) {
    match end.unread() {
        0 => {}
        1 => eprintln!("note: agent {agent} ended with 1 message it never received"),
        n => eprintln!("note: agent {agent} ended with {n} messages it never received"),
    }
}

/// Reports an agent's failure (with its position in the source, when known) and returns the
/// error that makes the exit code 1.
pub(crate) fn failed(
    json: bool,
    node: &str,
    what: &str,
    error: &str,
    position: Option<(u64, u64)>,
) -> anyhow::Error {
    let position = position.map(|(l, c)| (l as usize, c as usize));
    report_failure(json, node, what, error, position);
    AgentFailed.into()
}

/// Writes a failure to stderr: a JSON object with `json`, else one line naming the node and,
/// when known, the line and column.
pub(crate) fn report_failure(
    json: bool,
    node: &str,
    what: &str,
    message: &str,
    position: Option<(usize, usize)>,
) {
    if json {
        let (line, column) = position.map_or((None, None), |(l, c)| (Some(l), Some(c)));
        eprintln!(
            "{}",
            serde_json::json!({"error": message, "node": node, "agent": what, "line": line, "column": column})
        );
    } else {
        match position {
            Some((l, c)) => {
                eprintln!("error: {what} failed on {node} at line {l}, column {c}: {message}")
            }
            None => eprintln!("error: {what} failed on {node}: {message}"),
        }
    }
}
