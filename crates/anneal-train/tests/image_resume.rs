//! Every image objective resumes exactly: a run stopped after a checkpoint and restored into a
//! fresh trainer takes the same steps, bit for bit, as the run that never stopped (the
//! objective's own state, FixMatch's weight average and MoCo's momentum encoder, travels in the
//! checkpoint): supervised classification, FixMatch, MAE, MoCo v3 and a stage of layer-wise
//! autoencoder pretraining.

use anneal_data::augment::Pipeline;
use anneal_data::images::Views;
use anneal_data::ImageSet;
use anneal_train::checkpoint::{self, TrainerState};
use anneal_train::model::TrainModel;
use anneal_train::objectives::{
    FixMatch, ImageClassification, LayerwiseAutoencoder, Mae, MocoV3, Objective,
};
use anneal_train::trainer::Trainer;
use anneal_train::vision::{
    new_lenet, new_mlp, new_vit, simple_trainer, ImageData, Optim, TrainSettings, VitRole,
};

/// 40 images of 28×28 whose class (of 4) is the bright quarter.
fn data() -> ImageData {
    let make = |n: usize, salt: usize| {
        let mut pixels = Vec::with_capacity(n * 784);
        for i in 0..n {
            for y in 0..28 {
                for x in 0..28 {
                    let bright = (y / 14) * 2 + x / 14 == i % 4;
                    pixels.push(if bright {
                        200
                    } else {
                        ((x * 7 + y * 3 + i + salt) % 50) as u8
                    });
                }
            }
        }
        ImageSet {
            rows: 28,
            cols: 28,
            pixels,
            labels: (0..n).map(|i| (i % 4) as u8).collect(),
        }
    };
    ImageData::new("quarters", make(40, 0), make(8, 1), false)
}

const SETTINGS: TrainSettings = TrainSettings {
    steps: 6,
    batch: 4,
    lr: 1e-3,
    weight_decay: 0.01,
    optimizer: Optim::AdamW,
    seed: 3,
};

/// A fresh trainer for `kind`.
fn trainer(kind: &str, data: &ImageData) -> Trainer {
    let labelled: Vec<(usize, i64)> = (0..8).map(|i| (i, (i % 4) as i64)).collect();
    let all: Vec<(usize, i64)> = (0..data.train.len()).map(|i| (i, -1)).collect();
    let dims = data.dims();
    let (model, objective, source): (Box<dyn TrainModel>, Box<dyn Objective>, _) = match kind {
        "classification" => (
            Box::new(new_lenet(data, 1).unwrap()),
            Box::new(ImageClassification),
            data.source(labelled, Views::One(Pipeline::supervised(false))),
        ),
        "fixmatch" => {
            let mut source = data.source(
                labelled,
                Views::FixMatch {
                    weak: Pipeline::weak(dims, false),
                    strong: Pipeline::strong(dims, false),
                    ratio: 2,
                },
            );
            source.unlabelled = (0..data.train.len()).collect();
            let fixmatch = FixMatch {
                threshold: 0.3,
                ema_decay: 0.9,
                ..FixMatch::default()
            };
            (
                Box::new(new_lenet(data, 1).unwrap()),
                Box::new(fixmatch),
                source,
            )
        }
        "mae" => (
            Box::new(new_vit(data, VitRole::Mae, 1).unwrap()),
            Box::new(Mae::default()),
            data.source(all, Views::One(Pipeline::weak(dims, false))),
        ),
        "moco" => {
            let model = new_vit(data, VitRole::Contrastive, 1).unwrap();
            let momentum = new_vit(data, VitRole::Contrastive, 1).unwrap();
            let moco = MocoV3::new(&model, momentum, SETTINGS.steps).unwrap();
            (
                Box::new(model),
                Box::new(moco),
                data.source(all, Views::Two(Pipeline::contrastive(false))),
            )
        }
        "layerwise" => {
            let mut model = new_mlp(data, 1).unwrap();
            model
                .params
                .train_only(|n| n.starts_with("layers.1.") || n.starts_with("decoders.1."));
            (
                Box::new(model),
                Box::new(LayerwiseAutoencoder { layer: 1 }),
                data.source(all, Views::One(Pipeline::none())),
            )
        }
        other => panic!("no objective {other}"),
    };
    simple_trainer(model, objective, Box::new(source), &SETTINGS)
}

fn bits(t: &Trainer) -> Vec<u32> {
    let p = t.model().params();
    p.trainable_values(0..p.trainable_numel())
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn every_image_objective_resumes_bit_for_bit() {
    let data = data();
    for kind in ["classification", "fixmatch", "mae", "moco", "layerwise"] {
        let mut straight = trainer(kind, &data);
        let want: Vec<u64> = (0..SETTINGS.steps)
            .map(|_| straight.step().unwrap().loss.to_bits())
            .collect();

        let dir = tempfile::tempdir().unwrap();
        let mut first = trainer(kind, &data);
        let mut got: Vec<u64> = (0..3)
            .map(|_| first.step().unwrap().loss.to_bits())
            .collect();
        let state = TrainerState {
            format: 1,
            seed: SETTINGS.seed,
            ..TrainerState::default()
        };
        let saved = first
            .save(dir.path(), state)
            .unwrap()
            .expect("one device writes");
        drop(first);
        let loaded = checkpoint::load(&saved).unwrap();
        let mut resumed = trainer(kind, &data);
        resumed.restore(&loaded).unwrap();
        while resumed.steps() < SETTINGS.steps {
            got.push(resumed.step().unwrap().loss.to_bits());
        }
        assert_eq!(got, want, "{kind}: losses after resuming");
        assert_eq!(bits(&resumed), bits(&straight), "{kind}: final parameters");
        assert_eq!(
            resumed.objective().state(),
            straight.objective().state(),
            "{kind}: objective state"
        );
    }
}
