//! Reading and writing tensors in the safetensors format (the Hugging Face hub's checkpoint
//! format), with errors that name the file and the tensor.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, Result};
use crate::storage::Buffer;
use crate::Tensor;

/// Loads every tensor of a safetensors file. f32, bf16 and f16 keep their dtype; f64 and integer
/// tensors are converted to f32 (integer values up to 2²⁴ are exact).
pub fn load_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    decode_safetensors(&bytes, &path.display().to_string())
}

/// Parses safetensors bytes already in memory, as [`load_safetensors`]; `file` labels errors.
pub fn decode_safetensors(bytes: &[u8], file: &str) -> Result<HashMap<String, Tensor>> {
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| Error::SafeTensors(format!("{file}: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let shape = view.shape().to_vec();
        let buffer = match view.dtype() {
            StDtype::F32 => Buffer::F32(
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            StDtype::BF16 => Buffer::BF16(
                data.chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            StDtype::F16 => Buffer::F16(
                data.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            StDtype::F64 => Buffer::F32(
                data.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                    .collect(),
            ),
            StDtype::I64 => Buffer::F32(
                data.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                    .collect(),
            ),
            StDtype::I32 => Buffer::F32(
                data.chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as f32)
                    .collect(),
            ),
            StDtype::U8 | StDtype::BOOL => Buffer::F32(data.iter().map(|&b| b as f32).collect()),
            other => {
                return Err(Error::SafeTensors(format!(
                    "{file}: tensor {name:?} has unsupported dtype {other:?}"
                )))
            }
        };
        out.insert(name.to_string(), Tensor::from_buffer(buffer, &shape)?);
    }
    Ok(out)
}

/// Encodes named tensors as safetensors bytes, each in its own dtype.
pub fn encode_safetensors(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    // The tensors' own bytes are handed to the encoder in place, so encoding holds one copy of
    // them (the file's bytes) beside the tensors, not two.
    with_views(tensors, |views| {
        safetensors::serialize(views, None).map_err(|e| Error::SafeTensors(e.to_string()))
    })
}

/// Writes `tensors` to `path` in the safetensors format straight from their buffers, holding no
/// copy of their bytes (a checkpoint of a large model and its optimizer state then needs no
/// more memory than the state itself).
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    with_views(tensors, |views| {
        safetensors::serialize_to_file(views, None, path)
            .map_err(|e| Error::SafeTensors(format!("{}: {e}", path.display())))
    })
}

/// [`write_safetensors`] of flat f32 vectors (optimizer state), each a 1-D tensor, written from
/// the vectors themselves: no tensor is made of them, so their buffers go back to the allocator
/// when the caller drops them rather than into the engine's buffer cache, where vectors of the
/// model's size would never be asked for again.
pub fn write_f32_safetensors(path: &Path, vectors: &[(String, Vec<f32>)]) -> Result<()> {
    let layout: Vec<(String, usize)> = vectors.iter().map(|(n, v)| (n.clone(), v.len())).collect();
    write_f32_safetensors_with(path, &layout, |i, from, out| {
        out.copy_from_slice(&vectors[i].1[from..from + out.len()])
    })
}

/// Writes 1-D f32 tensors named and sized by `layout` to `path` in the safetensors format,
/// asking `read(index, from, out)` for each tensor's values a piece of [`STREAM_CHUNK`] at a
/// time: an optimizer's state is written from its own (8-bit, 16-bit or f32) storage, never
/// held as f32 copies. The header is written here (the format is an 8-byte little-endian
/// length, a JSON table of dtype, shape and byte offsets, space-padded to 8 bytes, then the
/// data), and files read back with the `safetensors` crate like any other.
pub fn write_f32_safetensors_with(
    path: &Path,
    layout: &[(String, usize)],
    mut read: impl FnMut(usize, usize, &mut [f32]),
) -> Result<()> {
    use std::io::Write;
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let mut header = String::from("{");
    let mut at = 0usize;
    for (i, (name, n)) in layout.iter().enumerate() {
        if name.contains(['"', '\\']) || name.chars().any(char::is_control) {
            return Err(Error::SafeTensors(format!(
                "{}: tensor name {name:?} cannot be written",
                path.display()
            )));
        }
        let end = at + 4 * n;
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{n}],\"data_offsets\":[{at},{end}]}}"
        ));
        at = end;
    }
    header.push('}');
    while !(8 + header.len()).is_multiple_of(8) {
        header.push(' ');
    }
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .and_then(|()| w.write_all(header.as_bytes()))
        .map_err(io)?;
    let mut piece = vec![0.0f32; STREAM_CHUNK];
    for (i, (_, n)) in layout.iter().enumerate() {
        for from in (0..*n).step_by(STREAM_CHUNK) {
            let out = &mut piece[..STREAM_CHUNK.min(n - from)];
            read(i, from, out);
            w.write_all(&le_bytes(out)).map_err(io)?;
        }
    }
    w.flush().map_err(io)
}

/// Values per piece [`write_f32_safetensors_with`] asks for (whole 8-bit optimizer blocks).
pub const STREAM_CHUNK: usize = crate::optim::STATE_CHUNK;

/// Runs `f` with the encoder's views of `tensors`' bytes, borrowed from their buffers.
fn with_views<R>(
    tensors: &[(String, Tensor)],
    f: impl FnOnce(Vec<(String, Bytes<'_>)>) -> Result<R>,
) -> Result<R> {
    let dense: Vec<Tensor> = tensors.iter().map(|(_, t)| t.contiguous_data()).collect();
    let guards: Vec<_> = dense.iter().map(|t| t.storage().read()).collect();
    let views: Vec<(String, Bytes<'_>)> = tensors
        .iter()
        .zip(&dense)
        .zip(&guards)
        .map(|(((name, _), t), buf)| {
            let (off, n) = (t.offset(), t.numel());
            let (dtype, bytes) = match &**buf {
                Buffer::F32(v) => (StDtype::F32, le_bytes(&v[off..off + n])),
                Buffer::BF16(v) => (StDtype::BF16, le_bytes(&v[off..off + n])),
                Buffer::F16(v) => (StDtype::F16, le_bytes(&v[off..off + n])),
            };
            (
                name.clone(),
                Bytes {
                    dtype,
                    shape: t.shape().to_vec(),
                    bytes,
                },
            )
        })
        .collect();
    f(views)
}

/// One tensor's little-endian bytes for the encoder.
struct Bytes<'a> {
    dtype: StDtype,
    shape: Vec<usize>,
    bytes: std::borrow::Cow<'a, [u8]>,
}

impl safetensors::View for Bytes<'_> {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Values whose in-memory bytes are their little-endian encoding (f32, bf16, f16).
trait LeValue: Copy {
    fn le(self, out: &mut Vec<u8>);
}

impl LeValue for f32 {
    fn le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl LeValue for half::bf16 {
    fn le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl LeValue for half::f16 {
    fn le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// The little-endian bytes of `values`: borrowed on a little-endian machine, copied elsewhere.
fn le_bytes<T: LeValue>(values: &[T]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: plain-old-data values without padding, viewed as the bytes they occupy.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        })
    } else {
        let mut out = Vec::with_capacity(std::mem::size_of_val(values));
        values.iter().for_each(|v| v.le(&mut out));
        std::borrow::Cow::Owned(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_f32_files_read_back_as_written() {
        let path =
            std::env::temp_dir().join(format!("anneal-io-{}.safetensors", std::process::id()));
        // Lengths around the piece size, an empty vector and an odd one.
        let vectors: Vec<(String, Vec<f32>)> = [STREAM_CHUNK + 3, 0, 7, 2 * STREAM_CHUNK]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let v = (0..n).map(|j| (j as f32 * 0.25 - i as f32).sin()).collect();
                (format!("s.{i}"), v)
            })
            .collect();
        write_f32_safetensors(&path, &vectors).unwrap();
        let back = load_safetensors(&path).unwrap();
        assert_eq!(back.len(), vectors.len());
        for (name, v) in &vectors {
            assert_eq!(back[name].shape(), &[v.len()]);
            assert_eq!(&back[name].to_vec_f32(), v, "{name}");
        }
        let bad = [("a\"b".to_string(), 1)];
        assert!(write_f32_safetensors_with(&path, &bad, |_, _, _| {}).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
