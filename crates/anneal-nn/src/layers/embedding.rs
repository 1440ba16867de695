//! A lookup table: row `id` of a `[rows, dim]` matrix for each id (token embeddings, learned
//! positions, token types).

use super::{join, Builder, Init, Split, Weights};
use anneal_tensor::{Error, ParamId, Result, Tensor};

/// A `[rows, dim]` table, `prefix.weight`, initialised Normal(0, std²), not decayed.
#[derive(Clone, Debug)]
pub struct Embedding {
    weight: ParamId,
    rows: usize,
}

impl Embedding {
    /// Declares `prefix.weight` of shape `[rows, dim]`.
    pub fn new(b: &mut Builder, prefix: &str, rows: usize, dim: usize, std: f32) -> Result<Self> {
        let weight = b.param(
            &join(prefix, "weight"),
            &[rows, dim],
            Init::Normal(std),
            false,
            Split::Replicated,
        )?;
        Ok(Embedding { weight, rows })
    }

    /// The table's id (an output head tied to it reads it).
    pub fn weight(&self) -> ParamId {
        self.weight
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Rows `ids` shaped `[…ids_shape, dim]`; fails naming the first id past the table (`op`
    /// names the caller in the error).
    pub fn forward(
        &self,
        w: &Weights,
        ids: &[u32],
        ids_shape: &[usize],
        op: &'static str,
    ) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.rows) {
            return Err(Error::IndexOutOfRange {
                op,
                index: bad as i64,
                limit: self.rows,
            });
        }
        w.get(self.weight)?.embedding(ids, ids_shape)
    }

    /// Rows `start..start + n` in order (learned positions).
    pub fn range(&self, w: &Weights, start: usize, n: usize) -> Result<Tensor> {
        w.get(self.weight)?.narrow(0, start, n)
    }
}
