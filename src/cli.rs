//! Terminal output of the standalone `upgrade` and `status` commands.
//!
//! Progress goes to stderr, results to stdout, so `--output json` stays machine-readable while a
//! person still sees progress. On a terminal each node gets a progress bar with its current step;
//! otherwise (CI logs, pipes) every step change is one plain line.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use capd_inplace::upgrade::cluster::{NodeOutcome, NodeReport, NodeResult, ProgressFn};
use capd_inplace::upgrade::jobs::Progress;
use capd_inplace::upgrade::step::Step;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// A progress reporter suited to where stderr goes.
pub fn progress_reporter() -> ProgressFn {
    if std::io::stderr().is_terminal() {
        bars()
    } else {
        Arc::new(|node: &str, progress: &Progress| eprintln!("{node}: {}", describe(progress)))
    }
}

fn describe(progress: &Progress) -> String {
    match progress {
        Progress::Queued => "queued".to_string(),
        Progress::Running(step) => step.to_string(),
        Progress::Done => "done".to_string(),
        Progress::Failed { message } => format!("FAILED: {message}"),
    }
}

fn bars() -> ProgressFn {
    let multi = MultiProgress::new();
    let bars: Mutex<HashMap<String, ProgressBar>> = Mutex::default();
    let style =
        ProgressStyle::with_template("{prefix:>24.bold} [{bar:20.cyan/blue}] {pos:>2}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    Arc::new(move |node: &str, progress: &Progress| {
        let mut bars = bars.lock().unwrap_or_else(|p| p.into_inner());
        let bar = bars.entry(node.to_string()).or_insert_with(|| {
            let bar = multi.add(ProgressBar::new(Step::total() as u64));
            bar.set_style(style.clone());
            bar.set_prefix(node.to_string());
            bar
        });
        match progress {
            Progress::Running(step) => {
                bar.set_position(step.number() as u64 - 1);
                bar.set_message(step.label());
            }
            Progress::Done => bar.finish_with_message("done"),
            Progress::Failed { message } => bar.abandon_with_message(format!("FAILED: {message}")),
            Progress::Queued => bar.set_message("queued"),
        }
    })
}

pub fn print_results(results: &[NodeResult], output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(results)?),
        Output::Text => {
            let rows: Vec<Vec<String>> = results
                .iter()
                .map(|r| {
                    let outcome = match &r.outcome {
                        NodeOutcome::AlreadyAtTarget => "already at target".to_string(),
                        NodeOutcome::Upgraded => "upgraded".to_string(),
                        NodeOutcome::Staged => "staged".to_string(),
                        NodeOutcome::Failed { message } => format!("FAILED: {message}"),
                        NodeOutcome::Skipped => "skipped (a control-plane node failed)".to_string(),
                        NodeOutcome::WouldUpgrade {
                            mode,
                            from: Some(from),
                        } => format!("would run {mode} (from {from})"),
                        NodeOutcome::WouldUpgrade { mode, from: None } => {
                            format!("would run {mode}")
                        }
                    };
                    vec![r.node.clone(), role(r.role).to_string(), outcome]
                })
                .collect();
            print!("{}", table(&["NODE", "ROLE", "RESULT"], &rows));
        }
    }
    Ok(())
}

pub fn print_status(reports: &[NodeReport], output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(reports)?),
        Output::Text => {
            let unknown = || "?".to_string();
            let yes_no = |b: Option<bool>| {
                b.map_or_else(unknown, |b| if b { "yes" } else { "no" }.to_string())
            };
            let rows: Vec<Vec<String>> = reports
                .iter()
                .map(|r| {
                    vec![
                        r.node.clone(),
                        role(r.role).to_string(),
                        r.kubelet_version.clone().unwrap_or_else(unknown),
                        r.kubeadm_version.clone().unwrap_or_else(unknown),
                        yes_no(r.ready),
                        yes_no(r.cordoned),
                        r.upgrade.as_ref().map_or_else(
                            || "-".to_string(),
                            |u| match &u.last_error {
                                Some(error) => {
                                    format!("{}: {} (last error: {error})", u.target, u.step)
                                }
                                None => format!("{}: {}", u.target, u.step),
                            },
                        ),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "NODE", "ROLE", "KUBELET", "KUBEADM", "READY", "CORDONED", "UPGRADE"
                    ],
                    &rows
                )
            );
        }
    }
    Ok(())
}

fn role(role: capd_inplace::node::Role) -> &'static str {
    match role {
        capd_inplace::node::Role::ControlPlane => "control-plane",
        capd_inplace::node::Role::Worker => "worker",
    }
}

/// Left-aligned columns separated by two spaces, like kubectl's tables.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_like_kubectl() {
        let out = table(
            &["NODE", "ROLE"],
            &[
                vec!["demo-cp-0".into(), "control-plane".into()],
                vec!["w".into(), "worker".into()],
            ],
        );
        assert_eq!(
            out,
            "NODE       ROLE\ndemo-cp-0  control-plane\nw          worker\n"
        );
    }
}
