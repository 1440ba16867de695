//! A lookup table: row `id` of a `[rows, dim]` matrix for each id (token embeddings, learned
//! positions, token types).

use super::{join, Builder, Init, Split, Weights};
use anneal_tensor::{Error, ParamId, Result, Tensor};

/// A `[rows, dim]` table, `prefix.weight`, initialised Normal(0, std²), not decayed.
#[derive(Clone, Debug)]
pub struct Embedding {
    weight: ParamId,
    rows: usize,
    /// Rows split across the tensor-parallel group (a vocabulary-parallel embedding).
    split: bool,
}

impl Embedding {
    /// Declares `prefix.weight` of shape `[rows, dim]`, whole on every rank.
    pub fn new(b: &mut Builder, prefix: &str, rows: usize, dim: usize, std: f32) -> Result<Self> {
        let weight = b.param(
            &join(prefix, "weight"),
            &[rows, dim],
            Init::Normal(std),
            false,
            Split::Replicated,
        )?;
        Ok(Embedding {
            weight,
            rows,
            split: false,
        })
    }

    /// Declares a token embedding whose rows (the vocabulary) are split across the
    /// tensor-parallel group (Megatron-LM's `VocabParallelEmbedding`, Shoeybi et al. 2019): each
    /// rank looks up the ids in its slice, zeros the others, and the ranks' lookups are summed.
    /// A vocabulary the group does not divide splits unevenly. Whole on one device.
    pub fn vocab_parallel(
        b: &mut Builder,
        prefix: &str,
        rows: usize,
        dim: usize,
        std: f32,
    ) -> Result<Self> {
        let (_, tp) = b.parallel().tensor_parallel();
        if tp == 1 {
            return Embedding::new(b, prefix, rows, dim, std);
        }
        if rows < tp {
            return Err(Error::Invalid {
                op: "Embedding::vocab_parallel",
                reason: format!("{rows} rows cannot be split over {tp} tensor-parallel ranks"),
            });
        }
        let weight = b.param(
            &join(prefix, "weight"),
            &[rows, dim],
            Init::Normal(std),
            false,
            Split::Axis(0),
        )?;
        Ok(Embedding {
            weight,
            rows,
            split: true,
        })
    }

    /// Whether the rows are split across the tensor-parallel group.
    pub fn is_split(&self) -> bool {
        self.split
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
        let table = w.get(self.weight)?;
        if !self.split {
            return table.embedding(ids, ids_shape);
        }
        // This rank's rows; ids elsewhere look up row 0 and are zeroed, then the ranks' partial
        // lookups are summed (each id is found on exactly one rank).
        let mine = w.parallel().axis_range(self.rows);
        let inside = |i: u32| mine.contains(&(i as usize));
        let local: Vec<u32> = ids
            .iter()
            .map(|&i| if inside(i) { i - mine.start as u32 } else { 0 })
            .collect();
        let mask: Vec<f32> = ids.iter().map(|&i| inside(i) as u32 as f32).collect();
        let mut mask_shape = ids_shape.to_vec();
        mask_shape.push(1);
        let mask = Tensor::from_f32(mask, &mask_shape)?.to_dtype(table.dtype());
        let rows = table.embedding(&local, ids_shape)?.mul(&mask)?;
        w.parallel().reduce_parallel(&rows)
    }

    /// Rows `start..start + n` in order (learned positions).
    pub fn range(&self, w: &Weights, start: usize, n: usize) -> Result<Tensor> {
        w.get(self.weight)?.narrow(0, start, n)
    }
}
