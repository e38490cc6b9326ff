//! MTCNN's P/R/O-Nets with the embedded weights against facenet-pytorch 2.6's networks on the
//! same inputs (fixtures from tools/convert_mtcnn_weights.py): max abs diff <= 1e-4.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use marlin::backend::Cpu;
use marlin::face::mtcnn::Mtcnn;
use marlin::model::weights::{read_safetensors_file, HostTensor};
use std::path::Path;

use crate::common;

fn t<B: Backend, const D: usize>(h: &HostTensor, dev: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(h.data.clone(), h.shape.clone()), dev)
}

fn diff<B: Backend, const D: usize>(ours: Tensor<B, D>, peer: &HostTensor) -> f32 {
    assert_eq!(ours.dims().to_vec(), peer.shape);
    let v = ours.into_data().into_vec::<f32>().unwrap();
    common::max_abs_diff(&v, &peer.data).diff
}

#[test]
fn pnet_rnet_onet_match_facenet_pytorch() {
    let dev = Default::default();
    let io = read_safetensors_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/face/nets.safetensors"),
    )
    .unwrap();
    let m = Mtcnn::<Cpu>::embedded(&dev).unwrap();
    let mut worst = 0f32;
    for case in ["pnet_a", "pnet_b"] {
        let (reg, prob) = m.pnet.forward(t(&io[&format!("{case}.input")], &dev));
        worst = worst.max(diff(reg, &io[&format!("{case}.out0")]));
        worst = worst.max(diff(prob, &io[&format!("{case}.out1")]));
    }
    let (reg, prob) = m.rnet.forward(t(&io["rnet.input"], &dev));
    worst = worst
        .max(diff(reg, &io["rnet.out0"]))
        .max(diff(prob, &io["rnet.out1"]));
    let (reg, lm, prob) = m.onet.forward(t(&io["onet.input"], &dev));
    worst = worst
        .max(diff(reg, &io["onet.out0"]))
        .max(diff(lm, &io["onet.out1"]))
        .max(diff(prob, &io["onet.out2"]));
    eprintln!("MTCNN nets: max abs diff {worst:.2e}");
    assert!(worst <= 1e-4, "max abs diff {worst}");
}
