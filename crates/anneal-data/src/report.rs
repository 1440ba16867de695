//! `anneal data report`: one self-contained HTML page about a pipeline's output directory:
//! documents through each stage, removal reasons, a histogram of every signal (PNG, embedded),
//! corpus-level diversity, the largest near-duplicate clusters, and examples of kept and
//! removed documents.
//!
//! Corpus-level diversity, over the kept documents:
//! - **distinct-n** = |distinct word n-grams| / |word n-grams| for n = 1, 2, 3 (Li et al. 2016,
//!   "A Diversity-Promoting Objective Function for Neural Conversation Models");
//! - **domain mixture entropy** H = −Σ_d p(d) log₂ p(d) over the share of kept bytes per domain,
//!   a domain being the directory a document's file sits in (0 bits: one domain; log₂ k: k
//!   domains in equal shares);
//! - near-duplicate **cluster sizes** (from `clusters.jsonl`).

use crate::pipeline::PipelineStats;
use crate::{io_err, Error, Result};
use base64::Engine;
use std::collections::{BTreeMap, HashSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// What the report found, besides the page itself.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReportSummary {
    /// Kept documents read.
    pub kept: u64,
    /// Rejected documents read.
    pub rejected: u64,
    /// distinct-1, distinct-2, distinct-3 over the kept documents.
    pub distinct_n: [f64; 3],
    /// Entropy of the kept bytes over domains, in bits.
    pub domain_entropy: f64,
    /// Domains and their kept bytes.
    pub domains: BTreeMap<String, u64>,
    /// Sizes of the largest near-duplicate clusters.
    pub largest_clusters: Vec<u64>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn excerpt(s: &str, chars: usize) -> String {
    let mut out: String = s.chars().take(chars).collect();
    if s.chars().count() > chars {
        out.push('…');
    }
    escape(&out)
}

fn jsonl_files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".jsonl"))
        })
        .collect();
    v.sort();
    v
}

fn for_each_line(files: &[PathBuf], mut f: impl FnMut(serde_json::Value)) -> Result<()> {
    for path in files {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        for line in std::io::BufReader::new(file).lines() {
            let line = line.map_err(io_err(path))?;
            if let Ok(v) = serde_json::from_str(&line) {
                f(v);
            }
        }
    }
    Ok(())
}

fn domain_of(source: &str) -> String {
    let path = source.rsplit_once(':').map_or(source, |(p, line)| {
        if line.chars().all(|c| c.is_ascii_digit()) {
            p
        } else {
            source
        }
    });
    Path::new(path)
        .parent()
        .and_then(|p| p.file_name())
        .map_or_else(
            || "(none)".to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
}

/// Writes the report of the pipeline output in `dir` to `out` (HTML).
pub fn write_report(dir: &Path, out: &Path) -> Result<ReportSummary> {
    let stats_path = dir.join("stats.json");
    let stats: PipelineStats =
        serde_json::from_str(&std::fs::read_to_string(&stats_path).map_err(io_err(&stats_path))?)
            .map_err(|e| Error::Format {
            path: stats_path.clone(),
            reason: format!("not a pipeline stats.json: {e}"),
        })?;
    let mut summary = ReportSummary::default();
    // Signals, diversity and examples from the kept documents.
    let mut signals: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut languages: BTreeMap<String, u64> = BTreeMap::new();
    let mut grams: [HashSet<u64>; 3] = Default::default();
    let mut gram_total = [0u64; 3];
    let mut kept_examples = Vec::new();
    for_each_line(&jsonl_files(dir, "kept-"), |v| {
        summary.kept += 1;
        let text = v["text"].as_str().unwrap_or("");
        let source = v["source"].as_str().unwrap_or("");
        *summary.domains.entry(domain_of(source)).or_default() += text.len() as u64;
        if let Some(obj) = v["signals"].as_object() {
            for (k, x) in obj {
                if let Some(f) = x.as_f64() {
                    signals.entry(k.clone()).or_default().push(f);
                } else if let Some(s) = x.as_str() {
                    *languages.entry(s.to_string()).or_default() += 1;
                }
            }
        }
        let words: Vec<u64> = text
            .split_whitespace()
            .map(|w| xxhash_rust::xxh3::xxh3_64(w.to_lowercase().as_bytes()))
            .collect();
        for n in 1..=3 {
            for g in words.windows(n) {
                let bytes: Vec<u8> = g.iter().flat_map(|h| h.to_le_bytes()).collect();
                grams[n - 1].insert(xxhash_rust::xxh3::xxh3_64(&bytes));
                gram_total[n - 1] += 1;
            }
        }
        if kept_examples.len() < 5 {
            kept_examples.push((source.to_string(), text.to_string()));
        }
    })?;
    for n in 0..3 {
        summary.distinct_n[n] = grams[n].len() as f64 / gram_total[n].max(1) as f64;
    }
    let total_bytes: u64 = summary.domains.values().sum();
    summary.domain_entropy = summary
        .domains
        .values()
        .filter(|&&b| b > 0)
        .map(|&b| {
            let p = b as f64 / total_bytes as f64;
            -p * p.log2()
        })
        .sum();
    let mut removed_examples: BTreeMap<String, Vec<(String, String, String)>> = BTreeMap::new();
    for_each_line(&jsonl_files(dir, "rejected-"), |v| {
        summary.rejected += 1;
        let stage = v["stage"].as_str().unwrap_or("?").to_string();
        let list = removed_examples.entry(stage).or_default();
        if list.len() < 3 {
            list.push((
                v["source"].as_str().unwrap_or("").to_string(),
                v["reason"].as_str().unwrap_or("").to_string(),
                v["text"].as_str().unwrap_or("").to_string(),
            ));
        }
    })?;
    let mut clusters: Vec<(u64, String, Vec<String>)> = Vec::new();
    let cluster_file = dir.join("clusters.jsonl");
    if cluster_file.is_file() {
        for_each_line(&[cluster_file], |v| {
            if clusters.len() < 10 {
                let members = v["members"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|m| m.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                clusters.push((
                    v["size"].as_u64().unwrap_or(0),
                    v["kept"].as_str().unwrap_or("").into(),
                    members,
                ));
            }
        })?;
    }
    summary.largest_clusters = clusters.iter().map(|c| c.0).collect();

    // The page.
    let encode = |png: &Path| -> Option<String> {
        std::fs::read(png)
            .ok()
            .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
    };
    let scratch = tempfile_dir(out)?;
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>anneal data report</title>\
         <style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}\
         table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}\
         td:first-child,th:first-child{text-align:left}pre{white-space:pre-wrap;background:#f6f6f6;\
         padding:8px;font-size:12px}img{max-width:100%}</style></head><body>",
    );
    html += &format!(
        "<h1>anneal data report</h1><p>{} · {} documents read ({:.1} MB), {} kept ({:.1} MB), {} removed; {} bad input lines skipped; {:.1} s ({:.1} MB/s)</p>",
        escape(&dir.display().to_string()),
        stats.input.documents,
        stats.input.bytes as f64 / 1e6,
        stats.kept,
        stats.kept_bytes as f64 / 1e6,
        stats.input.documents - stats.kept,
        stats.input.bad_count,
        stats.seconds,
        stats.mb_per_s()
    );
    html += "<h2>Stages</h2><table><tr><th>stage</th><th>documents in</th><th>removed</th><th>removed MB</th><th>share removed</th></tr>";
    for (name, st) in &stats.stages {
        html += &format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.1}%</td></tr>",
            escape(name),
            st.documents_in,
            st.removed,
            st.removed_bytes as f64 / 1e6,
            100.0 * st.removed as f64 / st.documents_in.max(1) as f64
        );
    }
    html += "</table><h2>Removal reasons</h2><table><tr><th>reason</th><th>documents</th></tr>";
    for (reason, n) in &stats.reasons {
        html += &format!("<tr><td>{}</td><td>{n}</td></tr>", escape(reason));
    }
    html += "</table><h2>Signals of the kept documents</h2>";
    for (name, values) in &signals {
        let png = scratch.join(format!("{name}.png"));
        anneal_chart::histogram(&png, name, name, values, 40)?;
        let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
        html += &format!("<h3>{} (mean {mean:.3})</h3>", escape(name));
        if let Some(b64) = encode(&png) {
            html += &format!(
                "<img alt=\"{}\" src=\"data:image/png;base64,{b64}\">",
                escape(name)
            );
        }
    }
    if !languages.is_empty() {
        html += "<h3>Languages</h3><table><tr><th>language</th><th>documents</th></tr>";
        for (l, n) in &languages {
            html += &format!("<tr><td>{}</td><td>{n}</td></tr>", escape(l));
        }
        html += "</table>";
    }
    html += &format!(
        "<h2>Diversity</h2><p>distinct-1 {:.3}, distinct-2 {:.3}, distinct-3 {:.3}; domain mixture entropy {:.2} bits over {} domains</p><table><tr><th>domain</th><th>kept MB</th><th>share</th></tr>",
        summary.distinct_n[0],
        summary.distinct_n[1],
        summary.distinct_n[2],
        summary.domain_entropy,
        summary.domains.len()
    );
    let mut domains: Vec<_> = summary.domains.iter().collect();
    domains.sort_by(|a, b| b.1.cmp(a.1));
    for (d, b) in domains.iter().take(30) {
        html += &format!(
            "<tr><td>{}</td><td>{:.2}</td><td>{:.1}%</td></tr>",
            escape(d),
            **b as f64 / 1e6,
            100.0 * **b as f64 / total_bytes.max(1) as f64
        );
    }
    html += "</table>";
    if !clusters.is_empty() {
        html += "<h2>Largest near-duplicate clusters</h2>";
        for (size, kept, members) in &clusters {
            html += &format!("<p><b>{size} documents</b>, kept {}</p><pre>", escape(kept));
            for m in members.iter().take(8) {
                html += &format!("{}\n", escape(m));
            }
            if members.len() > 8 {
                html += &format!("… and {} more\n", members.len() - 8);
            }
            html += "</pre>";
        }
    }
    html += "<h2>Examples kept</h2>";
    for (source, text) in &kept_examples {
        html += &format!("<p>{}</p><pre>{}</pre>", escape(source), excerpt(text, 600));
    }
    html += "<h2>Examples removed</h2>";
    for (stage, list) in &removed_examples {
        html += &format!("<h3>{}</h3>", escape(stage));
        for (source, reason, text) in list {
            html += &format!(
                "<p>{} — <i>{}</i></p><pre>{}</pre>",
                escape(source),
                escape(reason),
                excerpt(text, 400)
            );
        }
    }
    html += "</body></html>\n";
    // Written beside and renamed into place, so an earlier report is replaced whole or not at all.
    let tmp = scratch.join("report.html");
    std::fs::write(&tmp, html).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, out).map_err(io_err(out))?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(summary)
}

/// A scratch directory beside `out` for the chart images before they are embedded.
fn tempfile_dir(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .map_or("report".into(), |n| n.to_string_lossy().into_owned());
    let dir = out.with_file_name(format!(".{name}.charts"));
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_and_escaping() {
        assert_eq!(domain_of("/data/news/a.txt"), "news");
        assert_eq!(domain_of("/data/web/part.jsonl:17"), "web");
        assert_eq!(
            escape("<a href=\"x\">&</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;"
        );
        assert_eq!(excerpt("abcdef", 3), "abc…");
    }
}
