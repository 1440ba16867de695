//! Image sets in the IDX format of MNIST and Fashion-MNIST (LeCun et al. 1998; Xiao et al. 2017):
//! a big-endian header (two zero bytes, a type code, the number of dimensions, each dimension
//! as a u32) followed by the values, here unsigned bytes, read plain or gzip-compressed.
//!
//! A file that is not IDX, holds another type, or ends early is refused with its path and what
//! is wrong; nothing is read past a header that claims more than the file holds.

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

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_idx(&bytes);
        }
    }
}
