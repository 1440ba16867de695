//! What a reward model must beat: pairwise logistic regressions on surface features of the two
//! replies, trained on the same pairs and scored on the same held-out pairs. The length-only
//! baseline reads token and character counts; the bag-of-words one reads word counts. A reward
//! model no better than these has learnt length or vocabulary, not preference.

/// Surface features of a reply.
pub trait Features {
    /// The feature vector of `reply` (its tokens' count given).
    fn features(&self, reply: &str, tokens: usize) -> Vec<f32>;
}

/// Token count, its logarithm, and character count.
pub struct LengthFeatures;

impl Features for LengthFeatures {
    fn features(&self, reply: &str, tokens: usize) -> Vec<f32> {
        let t = tokens as f32;
        vec![t, (1.0 + t).ln(), reply.chars().count() as f32]
    }
}

/// Counts of the lower-cased words of a vocabulary (the training replies' words).
pub struct BagOfWords {
    vocab: std::collections::HashMap<String, usize>,
}

impl BagOfWords {
    /// The vocabulary of `texts`.
    pub fn fit<'a>(texts: impl Iterator<Item = &'a str>) -> BagOfWords {
        let mut vocab = std::collections::HashMap::new();
        for t in texts {
            for w in words(t) {
                let n = vocab.len();
                vocab.entry(w).or_insert(n);
            }
        }
        BagOfWords { vocab }
    }
}

fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

impl Features for BagOfWords {
    fn features(&self, reply: &str, _tokens: usize) -> Vec<f32> {
        let mut v = vec![0.0; self.vocab.len()];
        for w in words(reply) {
            if let Some(&i) = self.vocab.get(&w) {
                v[i] += 1.0;
            }
        }
        v
    }
}

/// Fits P(chosen ≻ rejected) = σ(w·(φ(chosen) − φ(rejected))) on `train` (pairs of feature
/// vectors, chosen first) by full-batch gradient descent on the mean log-loss plus `l2`·|w|²,
/// the features scaled by their spread over the training differences; returns the share of
/// `test` pairs it ranks right (ties count half).
pub fn pairwise_logistic(
    train: &[(Vec<f32>, Vec<f32>)],
    test: &[(Vec<f32>, Vec<f32>)],
    l2: f64,
    iterations: usize,
) -> f64 {
    let Some(d) = train.first().map(|(c, _)| c.len()) else {
        return 0.5;
    };
    let diff = |(c, r): &(Vec<f32>, Vec<f32>)| -> Vec<f64> {
        c.iter().zip(r).map(|(a, b)| (a - b) as f64).collect()
    };
    let x: Vec<Vec<f64>> = train.iter().map(diff).collect();
    let scale: Vec<f64> = (0..d)
        .map(|j| {
            let ms = x.iter().map(|v| v[j] * v[j]).sum::<f64>() / x.len() as f64;
            if ms > 0.0 {
                1.0 / ms.sqrt()
            } else {
                0.0
            }
        })
        .collect();
    let x: Vec<Vec<f64>> = x
        .into_iter()
        .map(|v| v.iter().zip(&scale).map(|(a, s)| a * s).collect())
        .collect();
    let mut w = vec![0.0f64; d];
    let n = x.len() as f64;
    // The log-loss of standardised features is 1/4-smooth per unit of |x|²: a step of 1 over
    // the mean squared norm (and the ridge) is stable.
    let mean_sq = x
        .iter()
        .map(|v| v.iter().map(|a| a * a).sum::<f64>())
        .sum::<f64>()
        / n;
    let lr = 1.0 / (0.25 * mean_sq + 2.0 * l2).max(1e-9);
    for _ in 0..iterations {
        let mut g: Vec<f64> = w.iter().map(|wj| 2.0 * l2 * wj).collect();
        for v in &x {
            let z: f64 = v.iter().zip(&w).map(|(a, b)| a * b).sum();
            // d/dw −ln σ(z) = −σ(−z)·x
            let s = 1.0 / (1.0 + z.exp());
            for (gj, a) in g.iter_mut().zip(v) {
                *gj -= s * a / n;
            }
        }
        for (wj, gj) in w.iter_mut().zip(&g) {
            *wj -= lr * gj;
        }
    }
    let right: f64 = test
        .iter()
        .map(|p| {
            let z: f64 = diff(p)
                .iter()
                .zip(&scale)
                .zip(&w)
                .map(|((a, s), b)| a * s * b)
                .sum();
            if z > 0.0 {
                1.0
            } else if z == 0.0 {
                0.5
            } else {
                0.0
            }
        })
        .sum();
    right / test.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_length_baseline_finds_a_length_preference_and_bag_of_words_a_word() {
        // Chosen replies are longer: the length baseline ranks every held-out pair right.
        let pair = |c: &str, r: &str| {
            let f = |s: &str| LengthFeatures.features(s, s.split(' ').count());
            (f(c), f(r))
        };
        let train = vec![
            pair("a b c d", "a b"),
            pair("x y z w v", "x y z"),
            pair("p q r", "p"),
        ];
        let test = vec![pair("m n o p q r", "m n"), pair("s t u", "s t")];
        assert_eq!(pairwise_logistic(&train, &test, 1e-3, 200), 1.0);
        // Chosen replies say "thanks", rejected ones do not; lengths are equal.
        let texts = [
            "thanks a lot",
            "go away now",
            "thanks so much",
            "leave me be",
        ];
        let bow = BagOfWords::fit(texts.iter().copied());
        let f = |s: &str| bow.features(s, 3);
        let train = vec![
            (f("thanks a lot"), f("go away now")),
            (f("thanks so much"), f("leave me be")),
        ];
        let test = vec![(f("thanks me now"), f("so go away"))];
        assert_eq!(pairwise_logistic(&train, &test, 1e-3, 200), 1.0);
        // Nothing to go on: ties, half right.
        let same = vec![(vec![1.0], vec![1.0])];
        assert_eq!(pairwise_logistic(&same, &same, 1e-3, 10), 0.5);
    }
}
