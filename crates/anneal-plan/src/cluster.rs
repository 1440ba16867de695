//! Accelerators and interconnects.
//!
//! Presets carry the vendors' published figures (dense tensor-core peaks, memory, NVLink and the
//! InfiniBand of the reference DGX/HGX node):
//! - A100 SXM (NVIDIA A100 Tensor Core GPU datasheet, 2021): 312 TFLOP/s bf16/fp16 dense,
//!   19.5 TFLOP/s fp32 (156 with TF32), 40 or 80 GB, NVLink 3 at 600 GB/s per GPU (both
//!   directions together); DGX A100: 8 GPUs, 8 × 200 Gb/s HDR InfiniBand for compute traffic.
//! - H100 SXM (NVIDIA H100 Tensor Core GPU datasheet, 2023): 989 TFLOP/s bf16/fp16 dense,
//!   67 TFLOP/s fp32 (495 with TF32), 80 GB, NVLink 4 at 900 GB/s; DGX H100: 8 GPUs,
//!   8 × 400 Gb/s NDR InfiniBand.
//! - H200 SXM (NVIDIA H200 datasheet, 2024): the H100's compute and NVLink with 141 GB of HBM3e.
//!
//! Link bandwidths are stored per GPU and per direction (half the bidirectional NVLink figure;
//! one NIC's line rate), which is what a ring collective's step moves. Latencies are typical
//! values, not datasheet figures: about 3 µs for an NVLink hop, 5 µs across InfiniBand.

use serde::{Deserialize, Serialize};

/// One kind of accelerator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Accelerator {
    /// Its name.
    pub name: String,
    /// Memory in bytes.
    pub memory: f64,
    /// Dense bf16/fp16 peak, FLOP/s.
    pub peak_half: f64,
    /// fp32 peak without TF32, FLOP/s.
    pub peak_fp32: f64,
}

/// A cluster of identical nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    /// The accelerator.
    pub accelerator: Accelerator,
    /// Accelerators per node.
    pub gpus_per_node: usize,
    /// Nodes.
    pub nodes: usize,
    /// Bandwidth between GPUs of a node, per GPU and direction, bytes/s.
    pub intra_bandwidth: f64,
    /// Latency of one intra-node transfer, seconds.
    pub intra_latency: f64,
    /// Bandwidth out of a node, per GPU and direction, bytes/s.
    pub inter_bandwidth: f64,
    /// Latency of one inter-node transfer, seconds.
    pub inter_latency: f64,
}

const GB: f64 = 1e9;
const TFLOPS: f64 = 1e12;

impl Cluster {
    /// A named preset: `a100-40gb`, `a100-80gb`, `h100`, `h200`, with `nodes` nodes of 8.
    pub fn preset(name: &str, nodes: usize) -> Option<Cluster> {
        let (accelerator, nvlink, nic) = match name {
            "a100-40gb" | "a100-80gb" => (
                Accelerator {
                    name: name.to_uppercase(),
                    memory: if name == "a100-40gb" {
                        40.0 * GB
                    } else {
                        80.0 * GB
                    },
                    peak_half: 312.0 * TFLOPS,
                    peak_fp32: 19.5 * TFLOPS,
                },
                600.0 * GB,
                200e9 / 8.0,
            ),
            "h100" | "h200" => (
                Accelerator {
                    name: name.to_uppercase(),
                    memory: if name == "h100" {
                        80.0 * GB
                    } else {
                        141.0 * GB
                    },
                    peak_half: 989.0 * TFLOPS,
                    peak_fp32: 67.0 * TFLOPS,
                },
                900.0 * GB,
                400e9 / 8.0,
            ),
            _ => return None,
        };
        Some(Cluster {
            accelerator,
            gpus_per_node: 8,
            nodes,
            intra_bandwidth: nvlink / 2.0,
            intra_latency: 3e-6,
            inter_bandwidth: nic,
            inter_latency: 5e-6,
        })
    }

    /// The preset names.
    pub const PRESETS: [&'static str; 4] = ["a100-40gb", "a100-80gb", "h100", "h200"];

    /// Accelerators in all.
    pub fn gpus(&self) -> usize {
        self.gpus_per_node * self.nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_carry_the_datasheet_figures() {
        let a = Cluster::preset("a100-80gb", 4).unwrap();
        assert_eq!(a.gpus(), 32);
        assert_eq!(a.accelerator.peak_half, 312e12);
        assert_eq!(a.accelerator.memory, 80e9);
        assert_eq!(a.intra_bandwidth, 300e9);
        assert_eq!(a.inter_bandwidth, 25e9);
        let h = Cluster::preset("h200", 1).unwrap();
        assert_eq!(h.accelerator.memory, 141e9);
        assert_eq!(h.accelerator.peak_half, 989e12);
        assert!(Cluster::PRESETS
            .iter()
            .all(|p| Cluster::preset(p, 1).is_some()));
        assert!(Cluster::preset("v100", 1).is_none());
    }
}
