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

/// One preset's datasheet figures: memory, dense half-precision and f32 peaks, NVLink bandwidth
/// (both directions together; a transfer gets half) and one NIC per GPU.
struct Preset {
    name: &'static str,
    memory_gb: f64,
    half_tflops: f64,
    fp32_tflops: f64,
    nvlink_gb: f64,
    nic_gbit: f64,
}

const PRESET_TABLE: [Preset; 4] = [
    Preset {
        name: "a100-40gb",
        memory_gb: 40.0,
        half_tflops: 312.0,
        fp32_tflops: 19.5,
        nvlink_gb: 600.0,
        nic_gbit: 200.0,
    },
    Preset {
        name: "a100-80gb",
        memory_gb: 80.0,
        half_tflops: 312.0,
        fp32_tflops: 19.5,
        nvlink_gb: 600.0,
        nic_gbit: 200.0,
    },
    Preset {
        name: "h100",
        memory_gb: 80.0,
        half_tflops: 989.0,
        fp32_tflops: 67.0,
        nvlink_gb: 900.0,
        nic_gbit: 400.0,
    },
    Preset {
        name: "h200",
        memory_gb: 141.0,
        half_tflops: 989.0,
        fp32_tflops: 67.0,
        nvlink_gb: 900.0,
        nic_gbit: 400.0,
    },
];

impl Cluster {
    /// A named preset (one of [`Cluster::PRESETS`]) with `nodes` nodes of 8.
    pub fn preset(name: &str, nodes: usize) -> Option<Cluster> {
        let p = PRESET_TABLE.iter().find(|p| p.name == name)?;
        Some(Cluster {
            accelerator: Accelerator {
                name: name.to_uppercase(),
                memory: p.memory_gb * GB,
                peak_half: p.half_tflops * TFLOPS,
                peak_fp32: p.fp32_tflops * TFLOPS,
            },
            gpus_per_node: 8,
            nodes,
            intra_bandwidth: p.nvlink_gb * GB / 2.0,
            intra_latency: 3e-6,
            inter_bandwidth: p.nic_gbit * 1e9 / 8.0,
            inter_latency: 5e-6,
        })
    }

    /// The preset names.
    pub const PRESETS: [&'static str; 4] = [
        PRESET_TABLE[0].name,
        PRESET_TABLE[1].name,
        PRESET_TABLE[2].name,
        PRESET_TABLE[3].name,
    ];

    /// This machine as a cluster of `ranks` CPU ranks in one node (anneal's `local` backend, or
    /// `mpirun` on one machine): each rank's share of the memory, its f32 peak in FLOP/s (the
    /// half-precision peak taken as the same, CPUs without bf16 matrix units run it at about f32's
    /// rate), and the all-reduce bus bandwidth (bytes/s) and per-step latency (s) measured
    /// between the ranks. Nothing here is a datasheet figure: the caller measures them.
    pub fn local(
        ranks: usize,
        memory: f64,
        peak_fp32: f64,
        bandwidth: f64,
        latency: f64,
    ) -> Cluster {
        let ranks = ranks.max(1);
        Cluster {
            accelerator: Accelerator {
                name: "CPU rank".into(),
                memory: memory / ranks as f64,
                peak_half: peak_fp32,
                peak_fp32,
            },
            gpus_per_node: ranks,
            nodes: 1,
            intra_bandwidth: bandwidth,
            intra_latency: latency,
            inter_bandwidth: bandwidth,
            inter_latency: latency,
        }
    }

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
