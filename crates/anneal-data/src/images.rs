//! Image sets in the IDX format of MNIST and Fashion-MNIST (LeCun et al. 1998; Xiao et al. 2017):
//! a big-endian header (two zero bytes, a type code, the number of dimensions, each dimension
//! as a u32) followed by the values, here unsigned bytes, read plain or gzip-compressed.
//!
//! A file that is not IDX, holds another type, or ends early is refused with its path and what
//! is wrong; nothing is read past a header that claims more than the file holds.

use crate::augment::{AugmentRng, Dims, Pipeline};
use crate::batch::{epoch_picks, Batch, BatchSource, LabelledImages, Sampler, Stream};
use crate::{Error, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Images of one size with a label each.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageSet {
    /// Rows of each image.
    pub rows: usize,
    /// Columns of each image.
    pub cols: usize,
    /// Pixels, image after image, row-major, 0–255.
    pub pixels: Vec<u8>,
    /// The class of each image.
    pub labels: Vec<u8>,
}

impl ImageSet {
    /// Images held.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether it holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image `i`'s pixels.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Reads an image file and its label file (IDX, plain or `.gz`), checking that they agree.
    pub fn load(images: &Path, labels: &Path) -> Result<ImageSet> {
        let (dims, pixels) = read_idx(images)?;
        let (ldims, labels_v) = read_idx(labels)?;
        let bad = |path: &Path, reason: String| Error::Format {
            path: path.to_path_buf(),
            reason,
        };
        if dims.len() != 3 {
            return Err(bad(
                images,
                format!("an image file has 3 dimensions (images, rows, columns), not {dims:?}"),
            ));
        }
        if ldims.len() != 1 || ldims[0] != dims[0] {
            return Err(bad(
                labels,
                format!(
                    "a label file has one dimension equal to the {} images, not {ldims:?}",
                    dims[0]
                ),
            ));
        }
        Ok(ImageSet {
            rows: dims[1],
            cols: dims[2],
            pixels,
            labels: labels_v,
        })
    }

    /// Fashion-MNIST's training or test set from the directory holding
    /// `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz` (`scripts/fetch-data.sh fashion-mnist`).
    pub fn fashion_mnist(dir: &Path, train: bool) -> Result<ImageSet> {
        let split = if train { "train" } else { "t10k" };
        ImageSet::load(
            &dir.join(format!("{split}-images-idx3-ubyte.gz")),
            &dir.join(format!("{split}-labels-idx1-ubyte.gz")),
        )
    }
}

impl ImageSet {
    /// MNIST digits from the directory of the `mnist` package's `{0..9}.json` (each
    /// `{"data": [...]}`: 28×28 values in [0, 1], digit after digit), as (training, test) sets.
    /// The package holds 10,000 digits, not the official 60,000/10,000 split: the last sixth of
    /// each digit's images is the test set (about 8,300 training and 1,700 test images).
    pub fn mnist_digits(dir: &Path) -> Result<(ImageSet, ImageSet)> {
        #[derive(serde::Deserialize)]
        struct Digits {
            data: Vec<f32>,
        }
        const SIDE: usize = 28;
        let empty = || ImageSet {
            rows: SIDE,
            cols: SIDE,
            pixels: Vec::new(),
            labels: Vec::new(),
        };
        let (mut train, mut test) = (empty(), empty());
        for digit in 0..10u8 {
            let path = dir.join(format!("{digit}.json"));
            let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            let bad = |reason: String| Error::Format {
                path: path.clone(),
                reason,
            };
            let parsed: Digits = serde_json::from_str(&text).map_err(|e| {
                bad(format!(
                    "not an mnist digits file ({{\"data\": [...]}}): {e}"
                ))
            })?;
            let n = parsed.data.len() / (SIDE * SIDE);
            if n == 0 || !parsed.data.len().is_multiple_of(SIDE * SIDE) {
                return Err(bad(format!(
                    "{} values are not a whole number of 28×28 images",
                    parsed.data.len()
                )));
            }
            if let Some(v) = parsed.data.iter().find(|v| !(0.0..=1.0).contains(*v)) {
                return Err(bad(format!("value {v} lies outside [0, 1]")));
            }
            let cut = n - n / 6;
            for (i, image) in parsed.data.chunks(SIDE * SIDE).enumerate() {
                let set = if i < cut { &mut train } else { &mut test };
                set.pixels
                    .extend(image.iter().map(|v| (v * 255.0).round() as u8));
                set.labels.push(digit);
            }
        }
        Ok((train, test))
    }

    /// The number of classes (the largest label + 1).
    pub fn classes(&self) -> usize {
        self.labels.iter().max().map_or(0, |&m| m as usize + 1)
    }

    /// `n` image indices balanced over the classes (`n / classes` of each, the first
    /// `n % classes` classes one more), drawn without replacement by `seed`, in a seeded order.
    /// Fails when `n` is 0 or a class has too few images.
    pub fn balanced_subset(&self, n: usize, seed: u64) -> Result<Vec<usize>> {
        let labels = self.labels.iter().map(|&l| l as usize);
        let picked = crate::batch::balanced_picks(labels, self.classes(), n, seed)?;
        let order = crate::Sampler { seed }.epoch_order(self.classes() as u64, picked.len());
        Ok(order.into_iter().map(|k| picked[k]).collect())
    }
}

/// Where `scripts/fetch-data.sh mnist` puts the `mnist` package's digits under the data cache.
pub fn mnist_digits_dir(cache: &Path) -> PathBuf {
    cache.join("mnist/package/src/digits")
}

/// How an [`ImageSource`] makes each example's images.
#[derive(Clone, Debug, PartialEq)]
pub enum Views {
    /// One view of each image.
    One(Pipeline),
    /// Two views of each image, drawn independently (contrastive learning).
    Two(Pipeline),
    /// FixMatch (Sohn et al. 2020): each example is a labelled image's weak view followed by
    /// `ratio` unlabelled images, each as a weak then a strong view (1 + 2·ratio images).
    FixMatch {
        /// The weak view.
        weak: Pipeline,
        /// The strong view.
        strong: Pipeline,
        /// Unlabelled images per labelled one (μ).
        ratio: usize,
    },
}

impl Views {
    /// Images per example.
    pub fn count(&self) -> usize {
        match self {
            Views::One(_) => 1,
            Views::Two(_) => 2,
            Views::FixMatch { ratio, .. } => 1 + 2 * ratio,
        }
    }
}

/// Examples of an image set visited once per epoch in the sampler's order ([`epoch_picks`]),
/// augmented and normalised. Each image's augmentation draws from a seed of the run's seed, the
/// step and the example's row in the step's batch, so a run sees the same views however its
/// steps are cut and whenever it resumes.
pub struct ImageSource {
    /// The images.
    pub set: std::sync::Arc<ImageSet>,
    /// The examples: an image index and the label it trains with (−1: unlabelled).
    pub examples: Vec<(usize, i64)>,
    /// The unlabelled images FixMatch draws beside each example, in an order of their own.
    pub unlabelled: Vec<usize>,
    /// How each example's images are made.
    pub views: Views,
    /// Pixel mean and standard deviation subtracted and divided after augmentation.
    pub normalise: (f32, f32),
}

impl ImageSource {
    /// The image shape.
    pub fn dims(&self) -> Dims {
        Dims {
            c: 1,
            h: self.set.rows,
            w: self.set.cols,
        }
    }

    /// Image `index` through `pipeline` with seed `seed`, normalised, appended to `out`.
    fn push_view(&self, out: &mut Vec<f32>, index: usize, pipeline: &Pipeline, seed: u64) {
        let start = out.len();
        out.extend(self.set.image(index).iter().map(|&p| p as f32 / 255.0));
        let image = &mut out[start..];
        pipeline.apply(image, self.dims(), &mut AugmentRng::new(seed));
        let (mean, std) = self.normalise;
        image.iter_mut().for_each(|v| *v = (*v - mean) / std);
    }
}

impl BatchSource for ImageSource {
    fn draw(&self, sampler: &Sampler, step: u64, micro: u64, batch: usize) -> Batch {
        use rayon::prelude::*;
        let picked = epoch_picks(sampler, step, micro, batch, self.examples.len());
        let companions = match &self.views {
            Views::FixMatch { ratio, .. } => {
                let order = Sampler {
                    seed: sampler.seed_of(Stream::Unlabelled, &[]),
                };
                epoch_picks(&order, step, micro, batch * ratio, self.unlabelled.len())
            }
            _ => Vec::new(),
        };
        let views = self.views.count();
        let per = self.dims().len();
        let first_row = micro as usize * batch;
        let rows: Vec<Vec<f32>> = picked
            .par_iter()
            .enumerate()
            .map(|(r, &e)| {
                let seed = |view: usize| {
                    sampler.seed_of(
                        Stream::Augment,
                        &[step, (first_row + r) as u64, view as u64],
                    )
                };
                let mut out = Vec::with_capacity(views * per);
                let image = self.examples[e].0;
                match &self.views {
                    Views::One(p) => self.push_view(&mut out, image, p, seed(0)),
                    Views::Two(p) => {
                        self.push_view(&mut out, image, p, seed(0));
                        self.push_view(&mut out, image, p, seed(1));
                    }
                    Views::FixMatch {
                        weak,
                        strong,
                        ratio,
                    } => {
                        self.push_view(&mut out, image, weak, seed(0));
                        for k in 0..*ratio {
                            let u = self.unlabelled[companions[r * ratio + k]];
                            self.push_view(&mut out, u, weak, seed(1 + 2 * k));
                            self.push_view(&mut out, u, strong, seed(2 + 2 * k));
                        }
                    }
                }
                out
            })
            .collect();
        Batch::Images(LabelledImages {
            pixels: rows.concat(),
            shape: [picked.len(), 1, self.set.rows, self.set.cols],
            views,
            labels: picked.iter().map(|&e| self.examples[e].1).collect(),
        })
    }
}

/// Fashion-MNIST's ten class names, by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// The unsigned-byte IDX type code.
const UBYTE: u8 = 0x08;

/// The dimensions and bytes of an unsigned-byte IDX file (gunzipped when it starts with the gzip
/// magic).
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let raw = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::Format {
                path: path.to_path_buf(),
                reason: format!("not valid gzip: {e}"),
            })?;
        out
    } else {
        raw
    };
    parse_idx(&bytes).map_err(|reason| Error::Format {
        path: path.to_path_buf(),
        reason,
    })
}

/// Parses unsigned-byte IDX `bytes`; the error says what is wrong.
pub fn parse_idx(bytes: &[u8]) -> std::result::Result<(Vec<usize>, Vec<u8>), String> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err("not an IDX file (it starts with two zero bytes, a type and a rank)".into());
    }
    if bytes[2] != UBYTE {
        return Err(format!(
            "IDX type 0x{:02x} is not supported: only unsigned bytes (0x08)",
            bytes[2]
        ));
    }
    let rank = bytes[3] as usize;
    let header = 4 + 4 * rank;
    if rank == 0 || bytes.len() < header {
        return Err(format!("the header of rank {rank} is cut short"));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            let at = 4 + 4 * i;
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
        })
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("dimensions {dims:?} overflow"))?;
    let body = &bytes[header..];
    if body.len() != count {
        return Err(format!(
            "dimensions {dims:?} need {count} values but the file holds {}",
            body.len()
        ));
    }
    Ok((dims, body.to_vec()))
}

/// Where `scripts/fetch-data.sh fashion-mnist` puts Fashion-MNIST under the data cache.
pub fn fashion_mnist_dir(cache: &Path) -> PathBuf {
    cache.join("fashion-mnist/usr/share/datasets/fashion-mnist")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn idx(dims: &[u32], body: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, UBYTE, dims.len() as u8];
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn reads_images_and_labels_plain_and_gzipped() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images.gz");
        let labels = dir.path().join("labels");
        let pixels: Vec<u8> = (0..2 * 2 * 3).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &idx(&[2, 2, 3], &pixels)).unwrap();
        std::fs::write(&images, gz.finish().unwrap()).unwrap();
        std::fs::write(&labels, idx(&[2], &[7, 1])).unwrap();
        let set = ImageSet::load(&images, &labels).unwrap();
        assert_eq!((set.len(), set.rows, set.cols), (2, 2, 3));
        assert_eq!(set.image(1), &pixels[6..]);
        assert_eq!(set.labels, vec![7, 1]);
        // Labels that do not match the images are named.
        std::fs::write(&labels, idx(&[3], &[7, 1, 2])).unwrap();
        let e = ImageSet::load(&images, &labels).unwrap_err().to_string();
        assert!(e.contains("labels") && e.contains("2 images"), "{e}");
    }

    #[test]
    fn malformed_files_are_refused_with_the_reason() {
        assert!(parse_idx(b"PK\x03\x04").unwrap_err().contains("not an IDX"));
        let mut v = idx(&[4], &[1, 2, 3, 4]);
        v[2] = 0x0d;
        assert!(parse_idx(&v).unwrap_err().contains("0x0d"));
        assert!(parse_idx(&idx(&[5], &[1, 2]))
            .unwrap_err()
            .contains("need 5"));
        assert!(parse_idx(&idx(&[u32::MAX, u32::MAX, u32::MAX], &[])).is_err());
    }

    #[test]
    fn balanced_subsets_are_balanced_seeded_and_checked() {
        let set = ImageSet {
            rows: 1,
            cols: 1,
            pixels: (0..100).collect(),
            labels: (0..100).map(|i| (i % 10) as u8).collect(),
        };
        let a = set.balanced_subset(30, 1).unwrap();
        assert_eq!(a, set.balanced_subset(30, 1).unwrap());
        assert_ne!(a, set.balanced_subset(30, 2).unwrap());
        let mut per = [0; 10];
        for &i in &a {
            per[set.labels[i] as usize] += 1;
        }
        assert_eq!(per, [3; 10]);
        let mut unique = a.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 30);
        let odd = set.balanced_subset(13, 1).unwrap();
        assert_eq!(odd.len(), 13);
        let e = set.balanced_subset(110, 1).unwrap_err().to_string();
        assert!(e.contains("at most 10 per class"), "{e}");
        assert!(set.balanced_subset(0, 1).is_err());
    }

    #[test]
    fn mnist_digit_files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        for d in 0..10 {
            let values: Vec<String> = (0..6 * 784)
                .map(|i| format!("{}", (i % 3) as f32 / 2.0))
                .collect();
            std::fs::write(
                dir.path().join(format!("{d}.json")),
                format!("{{ \"data\": [{}] }}", values.join(",")),
            )
            .unwrap();
        }
        let (train, test) = ImageSet::mnist_digits(dir.path()).unwrap();
        assert_eq!((train.len(), test.len()), (50, 10));
        assert_eq!(&train.image(0)[..3], &[0, 128, 255]);
        assert_eq!(test.labels[9], 9);
        std::fs::write(dir.path().join("3.json"), "{ \"data\": [0.5, 0.5] }").unwrap();
        let e = ImageSet::mnist_digits(dir.path()).unwrap_err().to_string();
        assert!(e.contains("3.json") && e.contains("28×28"), "{e}");
        std::fs::write(dir.path().join("3.json"), "[1,2]").unwrap();
        let e = ImageSet::mnist_digits(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not an mnist digits file"), "{e}");
    }

    #[test]
    fn image_source_draws_seeded_views_in_its_layout() {
        let set = std::sync::Arc::new(ImageSet {
            rows: 8,
            cols: 8,
            pixels: (0..20 * 64).map(|i| (i * 7 % 256) as u8).collect(),
            labels: (0..20).map(|i| (i % 4) as u8).collect(),
        });
        let dims = Dims { c: 1, h: 8, w: 8 };
        let source = |views| ImageSource {
            set: set.clone(),
            examples: (0..8).map(|i| (i, i as i64 % 4)).collect(),
            unlabelled: (8..20).collect(),
            views,
            normalise: (0.5, 0.25),
        };
        let sampler = Sampler { seed: 3 };
        let fixmatch = source(Views::FixMatch {
            weak: Pipeline::weak(dims, true),
            strong: Pipeline::strong(dims, true),
            ratio: 3,
        });
        let Batch::Images(a) = fixmatch.draw(&sampler, 5, 0, 4) else {
            panic!("not images")
        };
        assert_eq!((a.shape, a.views), ([4, 1, 8, 8], 7));
        assert_eq!(a.pixels.len(), 4 * 7 * 64);
        assert_eq!(a.image_shape(), [28, 1, 8, 8]);
        assert_eq!(Batch::Images(a.clone()), fixmatch.draw(&sampler, 5, 0, 4));
        assert_ne!(Batch::Images(a.clone()), fixmatch.draw(&sampler, 6, 0, 4));
        // Without augmentation a view is the normalised image.
        let plain = source(Views::One(Pipeline::none()));
        let Batch::Images(p) = plain.draw(&sampler, 0, 0, 8) else {
            panic!("not images")
        };
        let (mut seen, picked) = (Vec::new(), epoch_picks(&sampler, 0, 0, 8, 8));
        for (r, &e) in picked.iter().enumerate() {
            let want: Vec<f32> = set
                .image(e)
                .iter()
                .map(|&v| (v as f32 / 255.0 - 0.5) / 0.25)
                .collect();
            assert_eq!(&p.pixels[r * 64..(r + 1) * 64], &want[..]);
            seen.push(e);
        }
        seen.sort();
        assert_eq!(
            seen,
            (0..8).collect::<Vec<_>>(),
            "one epoch visits every example once"
        );
        let two = source(Views::Two(Pipeline::contrastive(true)));
        let Batch::Images(t) = two.draw(&sampler, 0, 0, 2) else {
            panic!("not images")
        };
        assert_eq!(t.views, 2);
        assert_ne!(t.pixels[..64], t.pixels[64..128], "two different views");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_idx(&bytes);
        }
    }
}
