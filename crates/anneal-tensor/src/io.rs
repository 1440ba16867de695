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
    let mut raw: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.contiguous_data();
        let buf = t.storage().read();
        let (off, n) = (t.offset(), t.numel());
        let (dtype, bytes) = match &*buf {
            Buffer::F32(v) => (
                StDtype::F32,
                v[off..off + n]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            Buffer::BF16(v) => (
                StDtype::BF16,
                v[off..off + n]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            Buffer::F16(v) => (
                StDtype::F16,
                v[off..off + n]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
        };
        raw.push((name.clone(), dtype, t.shape().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = raw
        .iter()
        .map(|(name, dt, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::SafeTensors(format!("{name}: {e}")))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, None).map_err(|e| Error::SafeTensors(e.to_string()))
}
