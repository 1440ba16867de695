//! Reading GGUF files (llama.cpp's model format, version 2 and 3): the metadata of every value
//! type, the tensor infos, and dequantisation of the tensor types small models ship in.
//!
//! Layout (llama.cpp `docs/gguf.md`): a header (magic `GGUF`, version, tensor count, metadata
//! count), the metadata as key/typed-value pairs, one info per tensor (name, dimensions with the
//! fastest-varying first, GGML type, offset into the data section), then the data section, which
//! starts at the next multiple of `general.alignment` (32 by default).
//!
//! A file is never trusted: every count and length is checked against the bytes that are left
//! before anything of that size is allocated, so a truncated or lying header ends in an error that
//! names the file and the field, not in an allocation of what the header claims.

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::Tensor;

/// Most dimensions a GGML tensor has.
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// GGUF type 0.
    U8(u8),
    /// GGUF type 1.
    I8(i8),
    /// GGUF type 2.
    U16(u16),
    /// GGUF type 3.
    I16(i16),
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 5.
    I32(i32),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 7.
    Bool(bool),
    /// GGUF type 8.
    String(String),
    /// GGUF type 9: values of one type.
    Array(Vec<GgufValue>),
    /// GGUF type 10.
    U64(u64),
    /// GGUF type 11.
    I64(i64),
    /// GGUF type 12.
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A GGML tensor type: how a tensor's elements are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// 32-bit floats.
    pub const F32: GgmlType = GgmlType(0);
    /// IEEE half floats.
    pub const F16: GgmlType = GgmlType(1);
    /// Blocks of 32: an f16 scale and 32 4-bit values, x = (q − 8)·d.
    pub const Q4_0: GgmlType = GgmlType(2);
    /// Blocks of 32: f16 scale and minimum and 32 4-bit values, x = q·d + m.
    pub const Q4_1: GgmlType = GgmlType(3);
    /// Blocks of 32: an f16 scale and 32 5-bit values, x = (q − 16)·d.
    pub const Q5_0: GgmlType = GgmlType(6);
    /// Blocks of 32: f16 scale and minimum and 32 5-bit values, x = q·d + m.
    pub const Q5_1: GgmlType = GgmlType(7);
    /// Blocks of 32: an f16 scale and 32 signed bytes, x = q·d.
    pub const Q8_0: GgmlType = GgmlType(8);
    /// 64-bit floats.
    pub const F64: GgmlType = GgmlType(28);
    /// bfloat16.
    pub const BF16: GgmlType = GgmlType(30);

    /// The name llama.cpp gives the type.
    pub fn name(self) -> String {
        const NAMES: [&str; 40] = [
            "F32",
            "F16",
            "Q4_0",
            "Q4_1",
            "Q4_2",
            "Q4_3",
            "Q5_0",
            "Q5_1",
            "Q8_0",
            "Q8_1",
            "Q2_K",
            "Q3_K",
            "Q4_K",
            "Q5_K",
            "Q6_K",
            "Q8_K",
            "IQ2_XXS",
            "IQ2_XS",
            "IQ3_XXS",
            "IQ1_S",
            "IQ4_NL",
            "IQ3_S",
            "IQ2_S",
            "IQ4_XS",
            "I8",
            "I16",
            "I32",
            "I64",
            "F64",
            "IQ1_M",
            "BF16",
            "Q4_0_4_4",
            "Q4_0_4_8",
            "Q4_0_8_8",
            "TQ1_0",
            "TQ2_0",
            "IQ4_NL_4_4",
            "IQ4_NL_4_8",
            "IQ4_NL_8_8",
            "MXFP4",
        ];
        NAMES
            .get(self.0 as usize)
            .map_or_else(|| format!("type {}", self.0), |n| n.to_string())
    }

    /// Elements per block and bytes per block, for the types this reader dequantises.
    pub fn block(self) -> Option<(usize, usize)> {
        Some(match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::F64 => (1, 8),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            _ => return None,
        })
    }

    /// Every type [`GgmlType::block`] knows.
    pub const SUPPORTED: [GgmlType; 9] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::F64,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ];
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// Where one tensor is and how it is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    /// Its name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Its shape, slowest-varying first (the reverse of the file's dimension order), as a
    /// row-major tensor has it: a `[576, 49152]` GGML embedding is `[49152, 576]` here.
    pub shape: Vec<usize>,
    /// Its storage type.
    pub ggml_type: GgmlType,
    /// Byte offset of its data from the start of the file.
    pub offset: usize,
    /// Bytes of its data.
    pub n_bytes: usize,
}

impl GgufTensorInfo {
    /// Elements of the tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed GGUF file: its metadata, its tensor infos, and the mapped bytes they point into.
pub struct GgufFile {
    /// The format version (2 or 3).
    pub version: u32,
    /// The metadata, by key.
    pub metadata: BTreeMap<String, GgufValue>,
    /// The tensors, in file order.
    pub tensors: Vec<GgufTensorInfo>,
    bytes: Bytes,
    file: String,
}

enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

fn gguf_err(file: &str, reason: impl std::fmt::Display) -> Error {
    Error::Gguf(format!("{file}: {reason}"))
}

/// A cursor over the header that refuses to read past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(gguf_err(
                self.file,
                format!(
                    "truncated: {what} needs {n} bytes at offset {} but the file ends {} bytes \
                     later",
                    self.pos,
                    self.left()
                ),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_size` bytes long: refused if that many could not fit
    /// in what is left of the file.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .filter(|&n| n.checked_mul(min_size).is_some_and(|b| b <= self.left()));
        fits.ok_or_else(|| {
            gguf_err(
                self.file,
                format!(
                    "{what} is {n}, but only {} bytes are left (each needs at least {min_size})",
                    self.left()
                ),
            )
        })
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| gguf_err(self.file, format!("{what} is not UTF-8")))
    }

    /// Smallest encoding of a value of type `t`, or an error naming the unknown type.
    fn min_size(&self, t: u32, key: &str) -> Result<usize> {
        Ok(match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 => 8,
            9 => 12,
            10..=12 => 8,
            _ => {
                return Err(gguf_err(
                    self.file,
                    format!("metadata {key:?} has unknown value type {t} (known: 0 to 12)"),
                ))
            }
        })
    }

    fn value(&mut self, t: u32, key: &str, depth: usize) -> Result<GgufValue> {
        let what = format!("metadata {key:?}");
        Ok(match t {
            0 => GgufValue::U8(self.array::<1>(&what)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(&what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => GgufValue::U32(self.u32(&what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(gguf_err(self.file, format!("{what}: bool byte {b}"))),
            },
            8 => GgufValue::String(self.string(&what)?),
            9 => {
                if depth > 0 {
                    return Err(gguf_err(self.file, format!("{what}: nested arrays")));
                }
                let et = self.u32(&what)?;
                let min = self.min_size(et, key)?;
                let n = self.count(&format!("{what}'s length"), min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(et, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(&what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(&what)?)),
            _ => {
                self.min_size(t, key)?;
                unreachable!("min_size refuses unknown types")
            }
        })
    }
}

impl GgufFile {
    /// Opens and parses `path`, mapping its bytes (the tensor data is read only when asked for).
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        let f = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed underneath while mapped is outside what
        // this reader guards against (as for every memory-mapped model loader).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io)?;
        GgufFile::parse(Bytes::Mapped(map), &path.display().to_string())
    }

    /// Parses GGUF bytes already in memory; `file` labels errors.
    pub fn from_bytes(bytes: Vec<u8>, file: &str) -> Result<GgufFile> {
        GgufFile::parse(Bytes::Owned(bytes), file)
    }

    fn parse(bytes: Bytes, file: &str) -> Result<GgufFile> {
        let b = bytes.as_slice();
        let mut r = Reader {
            bytes: b,
            pos: 0,
            file,
        };
        if r.take(4, "the magic").ok() != Some(b"GGUF".as_slice()) {
            return Err(gguf_err(
                file,
                "not a GGUF file (it does not start with \"GGUF\")",
            ));
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(gguf_err(
                file,
                format!("GGUF version {version}; this reader knows versions 2 and 3"),
            ));
        }
        // Each tensor info needs at least a name length, a dimension count, a type and an offset.
        let n_tensors = r.u64("the tensor count")?;
        let n_kv = r.count("the metadata count", 12)?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key {i}"))?;
            let t = r.u32(&format!("metadata {key:?}'s type"))?;
            let v = r.value(t, &key, 0)?;
            metadata.insert(key, v);
        }
        let n_tensors = usize::try_from(n_tensors)
            .ok()
            .filter(|n| n.checked_mul(24).is_some_and(|b| b <= r.left()))
            .ok_or_else(|| {
                gguf_err(
                    file,
                    format!(
                        "the tensor count is {n_tensors}, but only {} bytes of tensor infos are \
                         left",
                        r.left()
                    ),
                )
            })?;
        let mut raw = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = r.string(&format!("tensor {i}'s name"))?;
            let n_dims = r.u32(&format!("tensor {name:?}'s dimension count"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(gguf_err(
                    file,
                    format!("tensor {name:?} has {n_dims} dimensions (allowed: 1 to {MAX_DIMS})"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&format!("tensor {name:?}'s dimensions"))?);
            }
            let t = GgmlType(r.u32(&format!("tensor {name:?}'s type"))?);
            let offset = r.u64(&format!("tensor {name:?}'s offset"))?;
            raw.push((name, dims, t, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => {
                    return Err(gguf_err(
                        file,
                        format!("general.alignment = {v:?} (allowed: a power of two)"),
                    ))
                }
            },
        };
        let data_start = r.pos.next_multiple_of(alignment);
        let mut tensors = Vec::with_capacity(raw.len());
        let mut seen = std::collections::HashSet::new();
        for (name, dims, t, offset) in raw {
            if !seen.insert(name.clone()) {
                return Err(gguf_err(file, format!("tensor {name:?} appears twice")));
            }
            let numel = dims
                .iter()
                .try_fold(1usize, |acc, &d| {
                    usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
                })
                .filter(|&n| n > 0);
            let Some(numel) = numel else {
                return Err(gguf_err(
                    file,
                    format!("tensor {name:?} has dimensions {dims:?}: empty or too large"),
                ));
            };
            let Some((block, block_bytes)) = t.block() else {
                let known: Vec<String> = GgmlType::SUPPORTED.iter().map(|t| t.name()).collect();
                return Err(gguf_err(
                    file,
                    format!(
                        "tensor {name:?} is stored as {t}, which anneal cannot read (it reads {})",
                        known.join(", ")
                    ),
                ));
            };
            if !(dims[0] as usize).is_multiple_of(block) {
                return Err(gguf_err(
                    file,
                    format!(
                        "tensor {name:?}: its rows of {} elements are not whole {t} blocks of \
                         {block}",
                        dims[0]
                    ),
                ));
            }
            let n_bytes = numel / block * block_bytes;
            let start = usize::try_from(offset)
                .ok()
                .filter(|o| o.is_multiple_of(alignment))
                .and_then(|o| o.checked_add(data_start));
            let end = start.and_then(|s| s.checked_add(n_bytes));
            match (start, end) {
                (Some(s), Some(e)) if e <= b.len() => tensors.push(GgufTensorInfo {
                    name,
                    shape: dims.iter().rev().map(|&d| d as usize).collect(),
                    ggml_type: t,
                    offset: s,
                    n_bytes,
                }),
                _ => {
                    return Err(gguf_err(
                        file,
                        format!(
                            "tensor {name:?}: {n_bytes} bytes at data offset {offset} do not lie \
                             within the file ({} bytes, data from byte {data_start}, aligned to \
                             {alignment})",
                            b.len()
                        ),
                    ))
                }
            }
        }
        Ok(GgufFile {
            version,
            metadata,
            tensors,
            bytes,
            file: file.to_string(),
        })
    }

    /// The file name errors carry.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// The info of tensor `name`.
    pub fn info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor, as stored.
    pub fn raw(&self, info: &GgufTensorInfo) -> &[u8] {
        &self.bytes.as_slice()[info.offset..info.offset + info.n_bytes]
    }

    /// Tensor `name` dequantised to f32, in its row-major shape.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self
            .info(name)
            .ok_or_else(|| gguf_err(&self.file, format!("has no tensor {name:?}")))?;
        Tensor::from_f32(self.dequantize(info)?, &info.shape)
    }

    /// Every element of a tensor as f32.
    pub fn dequantize(&self, info: &GgufTensorInfo) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; info.numel()];
        dequantize_into(info.ggml_type, self.raw(info), &mut out)
            .map_err(|reason| gguf_err(&self.file, format!("tensor {:?}: {reason}", info.name)))?;
        Ok(out)
    }
}

/// Dequantises `bytes` of type `t` into `out` (whose length is the element count).
pub fn dequantize_into(
    t: GgmlType,
    bytes: &[u8],
    out: &mut [f32],
) -> std::result::Result<(), String> {
    let Some((block, block_bytes)) = t.block() else {
        return Err(format!("{t} cannot be dequantised"));
    };
    if !out.len().is_multiple_of(block) || bytes.len() != out.len() / block * block_bytes {
        return Err(format!(
            "{} bytes of {t} do not hold {} elements",
            bytes.len(),
            out.len()
        ));
    }
    // Blocks in parallel, a few thousand elements per task.
    let per_task = (4096 / block).max(1);
    out.par_chunks_mut(per_task * block)
        .zip(bytes.par_chunks(per_task * block_bytes))
        .for_each(|(o, b)| {
            for (o, b) in o.chunks_exact_mut(block).zip(b.chunks_exact(block_bytes)) {
                dequantize_block(t, b, o);
            }
        });
    Ok(())
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// One block of `t` (a single element for the float types).
pub(crate) fn dequantize_block(t: GgmlType, b: &[u8], o: &mut [f32]) {
    match t {
        GgmlType::F32 => o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => o[0] = f16_at(b, 0),
        GgmlType::BF16 => o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::F64 => o[0] = f64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as f32,
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for (o, &q) in o.iter_mut().zip(&b[2..34]) {
                *o = (q as i8) as f32 * d;
            }
        }
        // The 16 bytes hold elements j (low nibble) and j + 16 (high nibble), not neighbours.
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            for (j, &q) in b[2..18].iter().enumerate() {
                o[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for (j, &q) in b[4..20].iter().enumerate() {
                o[j] = (q & 0x0f) as f32 * d + m;
                o[j + 16] = (q >> 4) as f32 * d + m;
            }
        }
        // Bit j of the 32-bit `qh` is the fifth bit of element j.
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (d, m, at) = if t == GgmlType::Q5_0 {
                (f16_at(b, 0), None, 2)
            } else {
                (f16_at(b, 0), Some(f16_at(b, 2)), 4)
            };
            let qh = u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
            for (j, &q) in b[at + 4..at + 20].iter().enumerate() {
                let lo = (q & 0x0f) as u32 | ((qh >> j) & 1) << 4;
                let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                match m {
                    None => {
                        o[j] = (lo as i32 - 16) as f32 * d;
                        o[j + 16] = (hi as i32 - 16) as f32 * d;
                    }
                    Some(m) => {
                        o[j] = lo as f32 * d + m;
                        o[j + 16] = hi as f32 * d + m;
                    }
                }
            }
        }
        _ => unreachable!("dequantize_into checks the type"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file: `kv` as (key, type, encoded value) and tensors as (name, GGML dims, type,
    /// data), each placed at the next 32-byte boundary of the data section.
    fn file(
        kv: &[(&str, u32, Vec<u8>)],
        tensors: &[(&str, Vec<u64>, GgmlType, Vec<u8>)],
    ) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kv.len() as u64).to_le_bytes());
        for (k, t, v) in kv {
            b.extend(string(k));
            b.extend(t.to_le_bytes());
            b.extend(v);
        }
        let mut offset = 0u64;
        for (name, dims, t, data) in tensors {
            b.extend(string(name));
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(t.0.to_le_bytes());
            b.extend(offset.to_le_bytes());
            offset = (offset + data.len() as u64).next_multiple_of(32);
        }
        b.resize(b.len().next_multiple_of(32), 0);
        for (_, _, _, data) in tensors {
            b.extend(data);
            b.resize(b.len().next_multiple_of(32), 0);
        }
        b
    }

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend(s.as_bytes());
        v
    }

    fn f16b(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    /// One Q4_1 block: scale 0.5, minimum −1, element i holding the value i mod 16.
    fn q4_1_block() -> (Vec<u8>, Vec<f32>) {
        let mut b = f16b(0.5).to_vec();
        b.extend(f16b(-1.0));
        let q: Vec<u8> = (0..32).map(|i| (i * 7 % 16) as u8).collect();
        for j in 0..16 {
            b.push(q[j] | q[j + 16] << 4);
        }
        (b, q.iter().map(|&q| q as f32 * 0.5 - 1.0).collect())
    }

    #[test]
    fn reads_metadata_of_every_type_and_dequantises() {
        let mut arr = 8u32.to_le_bytes().to_vec();
        arr.extend(2u64.to_le_bytes());
        arr.extend(string("a"));
        arr.extend(string("bc"));
        let kv = vec![
            ("u8", 0, vec![7]),
            ("i8", 1, vec![0xff]),
            ("u16", 2, 513u16.to_le_bytes().to_vec()),
            ("i16", 3, (-2i16).to_le_bytes().to_vec()),
            ("u32", 4, 70000u32.to_le_bytes().to_vec()),
            ("i32", 5, (-3i32).to_le_bytes().to_vec()),
            ("f32", 6, 1.5f32.to_le_bytes().to_vec()),
            ("bool", 7, vec![1]),
            ("str", 8, string("llama")),
            ("arr", 9, arr),
            ("u64", 10, (1u64 << 40).to_le_bytes().to_vec()),
            ("i64", 11, (-5i64).to_le_bytes().to_vec()),
            ("f64", 12, 2.25f64.to_le_bytes().to_vec()),
        ];
        let (q41, q41_want) = q4_1_block();
        let mut q80 = f16b(0.25).to_vec();
        q80.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let q80_want: Vec<f32> = (0..32).map(|i| (i - 16) as f32 * 0.25).collect();
        let mut q40 = f16b(2.0).to_vec();
        q40.extend((0..16u8).map(|j| j | (15 - j) << 4));
        let q40_want: Vec<f32> = (0..32)
            .map(|i| if i < 16 { i - 8 } else { 15 - (i - 16) - 8 } as f32 * 2.0)
            .collect();
        // Q5_0 and Q5_1: element i holds i (so the fifth bit is set for i ≥ 16).
        let qh: u32 = 0xffff_0000;
        let nibbles: Vec<u8> = (0..16u8).map(|j| j | j << 4).collect();
        let mut q50 = f16b(1.0).to_vec();
        q50.extend(qh.to_le_bytes());
        q50.extend(&nibbles);
        let mut q51 = f16b(0.5).to_vec();
        q51.extend(f16b(3.0));
        q51.extend(qh.to_le_bytes());
        q51.extend(&nibbles);
        let f16s: Vec<u8> = [1.0f32, -2.5].iter().flat_map(|&x| f16b(x)).collect();
        let bf16s: Vec<u8> = [0.5f32, 4.0]
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect();
        let f32s: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let tensors = vec![
            ("q41", vec![32, 1], GgmlType::Q4_1, q41),
            ("q80", vec![32], GgmlType::Q8_0, q80),
            ("q40", vec![32], GgmlType::Q4_0, q40),
            ("q50", vec![32], GgmlType::Q5_0, q50),
            ("q51", vec![32], GgmlType::Q5_1, q51),
            ("f16", vec![2], GgmlType::F16, f16s),
            ("bf16", vec![2], GgmlType::BF16, bf16s),
            ("f32", vec![3, 2], GgmlType::F32, f32s),
        ];
        let g = GgufFile::from_bytes(file(&kv, &tensors), "t.gguf").unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get("u8"), Some(&GgufValue::U8(7)));
        assert_eq!(g.get("i8"), Some(&GgufValue::I8(-1)));
        assert_eq!(g.get("u16").and_then(GgufValue::as_u64), Some(513));
        assert_eq!(g.get("i16").and_then(GgufValue::as_i64), Some(-2));
        assert_eq!(g.get("u32").and_then(GgufValue::as_u64), Some(70000));
        assert_eq!(g.get("i32").and_then(GgufValue::as_i64), Some(-3));
        assert_eq!(g.get("f32").and_then(GgufValue::as_f64), Some(1.5));
        assert_eq!(g.get("bool").and_then(GgufValue::as_bool), Some(true));
        assert_eq!(g.get("str").and_then(GgufValue::as_str), Some("llama"));
        let arr = g.get("arr").and_then(GgufValue::as_array).unwrap();
        assert_eq!(arr[1].as_str(), Some("bc"));
        assert_eq!(g.get("u64").and_then(GgufValue::as_u64), Some(1 << 40));
        assert_eq!(g.get("i64").and_then(GgufValue::as_i64), Some(-5));
        assert_eq!(g.get("f64").and_then(GgufValue::as_f64), Some(2.25));

        assert_eq!(g.info("q41").unwrap().shape, vec![1, 32]);
        assert_eq!(g.tensor("q41").unwrap().to_vec_f32(), q41_want);
        assert_eq!(g.tensor("q80").unwrap().to_vec_f32(), q80_want);
        assert_eq!(g.tensor("q40").unwrap().to_vec_f32(), q40_want);
        let q50: Vec<f32> = (0..32).map(|i| (i - 16) as f32).collect();
        assert_eq!(g.tensor("q50").unwrap().to_vec_f32(), q50);
        let q51: Vec<f32> = (0..32).map(|i| i as f32 * 0.5 + 3.0).collect();
        assert_eq!(g.tensor("q51").unwrap().to_vec_f32(), q51);
        assert_eq!(g.tensor("f16").unwrap().to_vec_f32(), vec![1.0, -2.5]);
        assert_eq!(g.tensor("bf16").unwrap().to_vec_f32(), vec![0.5, 4.0]);
        let f = g.tensor("f32").unwrap();
        assert_eq!(f.shape(), &[2, 3]);
        assert_eq!(f.to_vec_f32(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    fn err(bytes: Vec<u8>) -> String {
        match GgufFile::from_bytes(bytes, "bad.gguf") {
            Ok(_) => panic!("accepted a malformed file"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn refuses_truncated_and_lying_files_by_name() {
        let (q41, _) = q4_1_block();
        let good = file(
            &[("general.architecture", 8, string("llama"))],
            &[("w", vec![32, 1], GgmlType::Q4_1, q41.clone())],
        );
        assert!(GgufFile::from_bytes(good.clone(), "ok.gguf").is_ok());
        // Every cut inside the header or the data ends in an error naming the file (the last
        // 12 bytes pad the 20 bytes of data to the alignment).
        for cut in [3, 10, 30, 50, 80, good.len() - 13] {
            let e = err(good[..cut].to_vec());
            assert!(e.contains("bad.gguf"), "{e}");
        }
        assert!(err(b"GGML\0\0\0\0".to_vec()).contains("not a GGUF file"));
        let mut v4 = good.clone();
        v4[4] = 4;
        assert!(err(v4).contains("version 4"));
        // A metadata count of 2⁶⁰ is refused before anything is allocated.
        let mut lying = good.clone();
        lying[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(err(lying).contains("metadata count"));
        // So is a string that claims more bytes than the file has.
        let mut long = good.clone();
        long[24..32].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(err(long).contains("metadata key 0"));
        // An array of 2⁶⁰ elements.
        let mut arr = 4u32.to_le_bytes().to_vec();
        arr.extend((1u64 << 60).to_le_bytes());
        let e = err(file(&[("a", 9, arr)], &[]));
        assert!(e.contains("\"a\"") && e.contains("length"), "{e}");
        // Unknown value and tensor types are named.
        assert!(err(file(&[("x", 13, vec![0; 8])], &[])).contains("unknown value type 13"));
        let e = err(file(&[], &[("w", vec![256], GgmlType(12), vec![0; 144])]));
        assert!(e.contains("\"w\"") && e.contains("Q4_K"), "{e}");
        // A row that is not whole blocks, and data past the end of the file.
        let e = err(file(&[], &[("w", vec![16], GgmlType::Q4_1, vec![0; 20])]));
        assert!(e.contains("whole Q4_1 blocks"), "{e}");
        let mut big = file(&[], &[("w", vec![32, 1], GgmlType::Q4_1, q41)]);
        // Header 24 bytes, name 9, dimension count 4, first dimension 8: the second is at 45.
        big[45..53].copy_from_slice(&1000u64.to_le_bytes());
        let e = err(big);
        assert!(e.contains("do not lie within the file"), "{e}");
        assert!(err(file(&[], &[("w", vec![0], GgmlType::F32, vec![])])).contains("empty"));
        let e = err(file(
            &[],
            &[("w", vec![1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4])],
        ));
        assert!(e.contains("5 dimensions"), "{e}");
    }
}
