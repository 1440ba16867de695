//! Dtype casts that carry gradients: the gradient is cast back to the source dtype.

use crate::autograd::Backward;
use crate::error::Result;
use crate::{DType, Tensor};

struct CastBackward {
    from: DType,
}

impl Backward for CastBackward {
    fn name(&self) -> &'static str {
        "to_dtype"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = grad.to_vec_f32();
        Ok(vec![Some(Tensor::from_f32_as(g, grad.shape(), self.from))])
    }
}

impl Tensor {
    /// The values in another dtype (round to nearest even when narrowing). Returns `self` when the
    /// dtype already matches.
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let value = Tensor::from_f32_as(self.to_vec_f32(), self.shape(), dtype);
        Tensor::from_op(value, &[self], CastBackward { from: self.dtype() })
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::randn;
    use crate::DType;

    #[test]
    fn cast_roundtrip_carries_grad() {
        let x = randn(&[6], 1).requires_grad_();
        let y = x.to_dtype(DType::BF16);
        assert_eq!(y.dtype(), DType::BF16);
        let back = y.to_dtype(DType::F32);
        for (a, b) in back.to_vec_f32().iter().zip(x.to_vec_f32()) {
            assert!((a - b).abs() <= b.abs() * 2f32.powi(-8));
        }
        back.scale(2.0).sum_all().unwrap().backward().unwrap();
        assert_eq!(x.grad().unwrap().to_vec_f32(), vec![2.0; 6]);
    }
}
