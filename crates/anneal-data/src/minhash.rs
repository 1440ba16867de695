//! Near-duplicate detection with MinHash and locality-sensitive hashing (Broder 1997, "On the
//! resemblance and containment of documents"; banding as in Leskovec, Rajaraman & Ullman,
//! "Mining of Massive Datasets", ch. 3).
//!
//! - A document becomes the set of its word n-grams (shingles; default 5 words, lower-cased,
//!   words split at non-alphanumeric characters), each hashed to 64 bits.
//! - Its signature holds, for each of k hash functions hᵢ(x) = (aᵢ·x + bᵢ) mod (2⁶¹ − 1), the
//!   minimum over its shingles. Two documents agree at one position with probability equal to
//!   their Jaccard similarity J = |A ∩ B| / |A ∪ B|, so the share of equal positions estimates J
//!   with standard error √(J(1 − J)/k).
//! - The signature is cut into b bands of r rows (b·r ≤ k). Two documents become candidates
//!   when all r rows of at least one band agree, which happens with probability
//!
//!   ```text
//!   P(J) = 1 − (1 − Jʳ)ᵇ        (the S-curve)
//!   ```
//!
//!   b and r are chosen for a target threshold t by minimising a weighted sum of the
//!   false-positive area ∫₀ᵗ P(s) ds and the false-negative area ∫ₜ¹ (1 − P(s)) ds (the rule
//!   `datasketch` uses). Candidates are verified afterwards, which removes false positives but
//!   cannot recover a missed pair, so misses weigh [`FALSE_NEGATIVE_WEIGHT`] times more.
//! - Candidates whose estimated similarity (the share of equal signature positions) is below t
//!   are dropped; the rest are joined with union-find, and each cluster keeps one document.
//!   Pairs within about two standard errors of t (±0.07 at t = 0.8 with 128 hashes) fall on
//!   either side by chance; more hashes narrow that band.

use std::collections::HashMap;

/// The Mersenne prime 2⁶¹ − 1, modulus of the hash family.
const PRIME: u64 = (1 << 61) - 1;

/// Settings of near-duplicate detection.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MinHashConfig {
    /// Words per shingle.
    pub ngram: usize,
    /// Jaccard similarity at or above which two documents are near-duplicates.
    pub threshold: f64,
    /// Bands b.
    pub bands: usize,
    /// Rows per band r.
    pub rows: usize,
    /// Seed of the hash family (every shard of one job must use the same).
    pub seed: u64,
}

/// Most hash functions a signature may hold (bands × rows, or `num_perm`): 65,536, 500 times
/// what near-duplicate dedup needs, and a bound on what a flag or a file can make anneal allocate.
pub const MAX_HASHES: usize = 1 << 16;

/// Checks MinHash settings, from flags or a pipeline file alike; the error names the key, its
/// value and what is allowed.
pub fn check_settings(
    threshold: f64,
    num_perm: usize,
    ngram: usize,
    bands_rows: Option<(usize, usize)>,
) -> crate::Result<()> {
    let bad = |key: &str, value: String, allowed: String| {
        Err(crate::Error::Invalid {
            key: key.into(),
            value,
            allowed,
        })
    };
    if !(threshold > 0.0 && threshold <= 1.0) {
        return bad(
            "threshold",
            threshold.to_string(),
            "a similarity in (0, 1]".into(),
        );
    }
    if !(1..=MAX_HASHES).contains(&num_perm) {
        return bad(
            "num_perm",
            num_perm.to_string(),
            format!("1 to {MAX_HASHES}"),
        );
    }
    if ngram == 0 {
        return bad("ngram", "0".into(), "at least 1 word".into());
    }
    if let Some((b, r)) = bands_rows {
        if b == 0 || r == 0 || b.saturating_mul(r) > MAX_HASHES {
            return bad(
                "bands × rows",
                format!("{b} × {r}"),
                format!("both at least 1, at most {MAX_HASHES} hashes in all"),
            );
        }
    }
    Ok(())
}

impl MinHashConfig {
    /// A configuration for `threshold` with at most `num_perm` hash functions, bands and rows
    /// chosen by [`optimal_bands`].
    pub fn new(threshold: f64, num_perm: usize, ngram: usize, seed: u64) -> MinHashConfig {
        let (bands, rows) = optimal_bands(threshold, num_perm);
        MinHashConfig {
            ngram,
            threshold,
            bands,
            rows,
            seed,
        }
    }

    /// Hash functions used: b·r.
    pub fn num_perm(&self) -> usize {
        self.bands * self.rows
    }

    /// Probability that two documents of Jaccard similarity `s` become candidates.
    pub fn s_curve(&self, s: f64) -> f64 {
        s_curve(s, self.bands, self.rows)
    }

    /// The S-curve as a small table, for logs and reports.
    pub fn describe_curve(&self) -> String {
        let mut out = format!(
            "MinHash LSH: {} bands × {} rows = {} hashes, {}-word shingles, threshold {}\n  Jaccard  P(candidate)\n",
            self.bands,
            self.rows,
            self.num_perm(),
            self.ngram,
            self.threshold
        );
        for s in [0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0] {
            out += &format!("  {s:7.2}  {:.4}\n", self.s_curve(s));
        }
        out
    }
}

/// P(J) = 1 − (1 − Jʳ)ᵇ.
pub fn s_curve(s: f64, bands: usize, rows: usize) -> f64 {
    1.0 - (1.0 - s.powi(rows as i32)).powi(bands as i32)
}

/// How much more a missed pair (false negative) weighs than a spurious candidate when choosing
/// bands: candidates are verified, misses are final.
pub const FALSE_NEGATIVE_WEIGHT: f64 = 4.0;

/// The (bands, rows) with bands·rows ≤ `num_perm` that minimise the false-positive area plus
/// [`FALSE_NEGATIVE_WEIGHT`] times the false-negative area of the S-curve around `threshold`
/// (trapezoid rule, 200 steps each).
pub fn optimal_bands(threshold: f64, num_perm: usize) -> (usize, usize) {
    let integrate = |f: &dyn Fn(f64) -> f64, a: f64, b: f64| {
        let n = 200;
        let h = (b - a) / n as f64;
        (0..=n)
            .map(|i| {
                let w = if i == 0 || i == n { 0.5 } else { 1.0 };
                w * f(a + i as f64 * h)
            })
            .sum::<f64>()
            * h
    };
    let mut best = (1, 1, f64::INFINITY);
    for b in 1..=num_perm {
        for r in 1..=num_perm / b {
            let fp = integrate(&|s| s_curve(s, b, r), 0.0, threshold);
            let fn_ = integrate(&|s| 1.0 - s_curve(s, b, r), threshold, 1.0);
            let cost = fp + FALSE_NEGATIVE_WEIGHT * fn_;
            if cost < best.2 {
                best = (b, r, cost);
            }
        }
    }
    (best.0, best.1)
}

/// The distinct 64-bit hashes of a text's word n-grams (a text shorter than n words is one
/// shingle). Sorted.
pub fn shingles(text: &str, n: usize) -> Vec<u64> {
    let words: Vec<u64> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| xxhash_rust::xxh3::xxh3_64(w.to_lowercase().as_bytes()))
        .collect();
    if words.is_empty() {
        return Vec::new();
    }
    let n = n.max(1).min(words.len());
    let mut out: Vec<u64> = words
        .windows(n)
        .map(|w| {
            let bytes: Vec<u8> = w.iter().flat_map(|h| h.to_le_bytes()).collect();
            xxhash_rust::xxh3::xxh3_64(&bytes)
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Exact Jaccard similarity of two sorted, distinct hash sets.
pub fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let (mut i, mut j, mut common) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                common += 1;
                i += 1;
                j += 1;
            }
        }
    }
    common as f64 / (a.len() + b.len() - common) as f64
}

/// Computes MinHash signatures for one configuration.
#[derive(Clone)]
pub struct MinHasher {
    config: MinHashConfig,
    a: Vec<u64>,
    b: Vec<u64>,
}

/// (a·x + b) mod (2⁶¹ − 1) for a, x, b < 2⁶¹ − 1, by folding: 2⁶¹ ≡ 1, so the bits above 61
/// add onto the bits below (no division).
fn mul_add_mod(a: u64, x: u64, b: u64) -> u64 {
    let v = a as u128 * x as u128 + b as u128;
    let p = PRIME as u128;
    let v = (v & p) + (v >> 61);
    let v = ((v & p) + (v >> 61)) as u64;
    if v >= PRIME {
        v - PRIME
    } else {
        v
    }
}

impl MinHasher {
    /// The hash family of `config` (drawn from its seed, so every process agrees).
    pub fn new(config: MinHashConfig) -> MinHasher {
        let k = config.num_perm();
        let mut state = config.seed;
        let mut next = || {
            // splitmix64: a fixed, portable stream from the seed.
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let a = (0..k).map(|_| 1 + next() % (PRIME - 1)).collect();
        let b = (0..k).map(|_| next() % PRIME).collect();
        MinHasher { config, a, b }
    }

    /// Its configuration.
    pub fn config(&self) -> &MinHashConfig {
        &self.config
    }

    /// The signature of a shingle set (all `u64::MAX` for an empty set).
    pub fn signature_of(&self, shingles: &[u64]) -> Vec<u64> {
        let mut sig = vec![u64::MAX; self.a.len()];
        for &s in shingles {
            let x = s % PRIME;
            for (i, m) in sig.iter_mut().enumerate() {
                let h = mul_add_mod(self.a[i], x, self.b[i]);
                if h < *m {
                    *m = h;
                }
            }
        }
        sig
    }

    /// The signature of a text.
    pub fn signature(&self, text: &str) -> Vec<u64> {
        self.signature_of(&shingles(text, self.config.ngram))
    }

    /// One hash per band of a signature: the bucket keys.
    pub fn band_keys(&self, signature: &[u64]) -> Vec<u64> {
        let r = self.config.rows;
        (0..self.config.bands)
            .map(|band| {
                let bytes: Vec<u8> = signature[band * r..(band + 1) * r]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, band as u64)
            })
            .collect()
    }
}

/// Share of equal positions of two signatures: the estimate of their Jaccard similarity.
pub fn estimated_jaccard(a: &[u64], b: &[u64]) -> f64 {
    let equal = a.iter().zip(b).filter(|(x, y)| x == y).count();
    equal as f64 / a.len().max(1) as f64
}

/// Disjoint sets over document indices, with path halving and union by index (the smaller index
/// becomes the root, so each cluster's root is its first document).
#[derive(Clone, Debug)]
pub struct UnionFind {
    parent: Vec<u32>,
}

impl UnionFind {
    /// `n` singletons.
    pub fn new(n: usize) -> UnionFind {
        UnionFind {
            parent: (0..n as u32).collect(),
        }
    }

    /// The root of `x`'s set.
    pub fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let p = self.parent[x as usize];
            self.parent[x as usize] = self.parent[p as usize];
            x = self.parent[x as usize];
        }
        x
    }

    /// Joins the sets of `a` and `b`.
    pub fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
            self.parent[hi as usize] = lo;
        }
    }
}

/// The outcome of clustering: which pairs were judged near-duplicates, and the clusters.
#[derive(Clone, Debug)]
pub struct Clusters {
    /// Verified candidate pairs (i < j).
    pub pairs: Vec<(u32, u32)>,
    /// Candidate pairs the LSH buckets produced before verification.
    pub candidates: usize,
    /// Cluster root of every document (the cluster's first document).
    pub root: Vec<u32>,
}

impl Clusters {
    /// Whether document `i` is kept (it is its cluster's first document).
    pub fn is_kept(&self, i: usize) -> bool {
        self.root[i] as usize == i
    }

    /// Clusters with more than one document, largest first: (root, members).
    pub fn groups(&self) -> Vec<(u32, Vec<u32>)> {
        let mut by_root: HashMap<u32, Vec<u32>> = HashMap::new();
        for (i, &r) in self.root.iter().enumerate() {
            by_root.entry(r).or_default().push(i as u32);
        }
        let mut g: Vec<(u32, Vec<u32>)> =
            by_root.into_iter().filter(|(_, m)| m.len() > 1).collect();
        g.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        g
    }
}

/// Buckets each document by its band keys, verifies candidates by estimated similarity and
/// clusters them. `signatures[i]` belongs to document i; documents with empty text (all-MAX
/// signatures) are never matched.
pub fn cluster(hasher: &MinHasher, signatures: &[Vec<u64>]) -> Clusters {
    let cfg = hasher.config();
    let mut buckets: HashMap<(u32, u64), Vec<u32>> = HashMap::new();
    for (i, sig) in signatures.iter().enumerate() {
        if sig.iter().all(|&v| v == u64::MAX) {
            continue;
        }
        for (band, key) in hasher.band_keys(sig).into_iter().enumerate() {
            buckets
                .entry((band as u32, key))
                .or_default()
                .push(i as u32);
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut pairs = Vec::new();
    let mut uf = UnionFind::new(signatures.len());
    let mut keys: Vec<_> = buckets.keys().copied().collect();
    keys.sort_unstable();
    for key in keys {
        let members = &buckets[&key];
        if members.len() < 2 {
            continue;
        }
        // Every pair in a small bucket; in a large one, each member against the first few, which
        // keeps the work linear while still linking the whole bucket.
        let anchors = if members.len() <= 64 {
            members.len()
        } else {
            8
        };
        for x in 0..anchors {
            for y in x + 1..members.len() {
                let (i, j) = (members[x].min(members[y]), members[x].max(members[y]));
                if !seen.insert((i, j)) {
                    continue;
                }
                let est = estimated_jaccard(&signatures[i as usize], &signatures[j as usize]);
                if est >= cfg.threshold {
                    pairs.push((i, j));
                    uf.union(i, j);
                }
            }
        }
    }
    let candidates = seen.len();
    pairs.sort_unstable();
    let root = (0..signatures.len() as u32).map(|i| uf.find(i)).collect();
    Clusters {
        pairs,
        candidates,
        root,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s_curve_and_band_choice_centre_on_the_threshold() {
        let cfg = MinHashConfig::new(0.8, 128, 5, 1);
        assert!(cfg.num_perm() <= 128);
        // The steepest part of the curve sits near the threshold: (1/b)^(1/r) ≈ t.
        let knee = (1.0 / cfg.bands as f64).powf(1.0 / cfg.rows as f64);
        assert!((knee - 0.8).abs() < 0.08, "{cfg:?}, knee {knee}");
        assert!(
            cfg.s_curve(0.95) > 0.99 && cfg.s_curve(0.5) < 0.05,
            "{}",
            cfg.describe_curve()
        );
        let low = MinHashConfig::new(0.5, 128, 5, 1);
        assert!(low.s_curve(0.6) > cfg.s_curve(0.6));
        assert!(cfg.describe_curve().contains("bands"));
    }

    #[test]
    fn shingles_ignore_case_and_punctuation() {
        let a = shingles("The quick brown fox jumps over the lazy dog", 3);
        let b = shingles("the QUICK, brown fox -- jumps over the lazy dog!", 3);
        assert_eq!(a, b);
        assert_eq!(a.len(), 7);
        assert_eq!(shingles("two words", 5).len(), 1);
        assert!(shingles("  ...  ", 5).is_empty());
        assert_eq!(jaccard(&a, &a), 1.0);
    }

    #[test]
    fn signatures_estimate_jaccard() {
        let h = MinHasher::new(MinHashConfig {
            ngram: 1,
            threshold: 0.8,
            bands: 64,
            rows: 8,
            seed: 3,
        });
        let a: Vec<u64> = (0..600).collect();
        let b: Vec<u64> = (200..800).collect(); // J = 400 / 800 = 0.5
        let est = estimated_jaccard(&h.signature_of(&a), &h.signature_of(&b));
        assert!((est - 0.5).abs() < 0.06, "{est}");
        assert_eq!(
            h.signature_of(&a),
            MinHasher::new(h.config().clone()).signature_of(&a)
        );
    }

    #[test]
    fn folded_modulus_matches_division() {
        let mut x = 12345u64;
        for _ in 0..10_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (a, v, b) = (x % PRIME, (x >> 3) % PRIME, (x >> 7) % PRIME);
            let want = ((a as u128 * v as u128 + b as u128) % PRIME as u128) as u64;
            assert_eq!(mul_add_mod(a, v, b), want);
        }
        assert_eq!(
            mul_add_mod(PRIME - 1, PRIME - 1, PRIME - 1),
            ((PRIME as u128 - 1).pow(2) % PRIME as u128 + PRIME as u128 - 1) as u64 % PRIME
        );
    }

    #[test]
    fn union_find_roots_at_the_first_document() {
        let mut uf = UnionFind::new(6);
        uf.union(4, 2);
        uf.union(5, 4);
        uf.union(1, 3);
        assert_eq!(uf.find(5), 2);
        assert_eq!(uf.find(3), 1);
        assert_eq!(uf.find(0), 0);
    }
}
