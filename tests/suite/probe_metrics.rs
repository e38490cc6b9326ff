//! Accuracy and AUROC against scikit-learn 1.9 on seeded scores with ties
//! (tools/make_probe_fixtures.py): equal within 1e-6, including a multilabel label with one
//! class only (null, left out of the macro average).

use marlin::probe::metrics::{evaluate, TaskKind};
use serde_json::Value;

fn fx() -> Value {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/probe/metrics.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn close(a: f64, b: &Value, what: &str) {
    let b = b.as_f64().unwrap();
    assert!((a - b).abs() <= 1e-6, "{what}: ours {a}, scikit-learn {b}");
}

#[test]
fn binary_multilabel_multiclass_equal_scikit_learn() {
    let f = fx();
    let b = &f["binary"];
    let m = evaluate(
        TaskKind::Binary,
        &[],
        &f32s(&b["probs"]),
        &f32s(&b["targets"]),
        1,
    );
    close(m.accuracy, &b["accuracy"], "binary accuracy");
    close(m.auroc_macro.unwrap(), &b["auroc"], "binary AUROC");

    let ml = &f["multilabel"];
    let names: Vec<String> = serde_json::from_value(ml["names"].clone()).unwrap();
    let k = ml["k"].as_u64().unwrap() as usize;
    let m = evaluate(
        TaskKind::Multilabel,
        &names,
        &f32s(&ml["probs"]),
        &f32s(&ml["targets"]),
        k,
    );
    close(m.accuracy, &ml["accuracy"], "multilabel accuracy");
    close(
        m.auroc_micro.unwrap(),
        &ml["auroc_micro"],
        "multilabel micro AUROC",
    );
    close(
        m.auroc_macro.unwrap(),
        &ml["auroc_macro"],
        "multilabel macro AUROC",
    );
    assert_eq!(m.undefined_labels, 1);
    for (c, l) in m.per_label.iter().enumerate() {
        close(
            l.accuracy,
            &ml["per_label_accuracy"][c],
            "per-label accuracy",
        );
        match (&l.auroc, &ml["per_label_auroc"][c]) {
            (None, Value::Null) => assert_eq!(l.name, "never"),
            (Some(a), b) => close(*a, b, &format!("AUROC of {}", l.name)),
            (None, b) => panic!("{}: ours undefined, scikit-learn {b}", l.name),
        }
    }

    let mc = &f["multiclass"];
    let k = mc["k"].as_u64().unwrap() as usize;
    let m = evaluate(
        TaskKind::Multiclass,
        &[],
        &f32s(&mc["probs"]),
        &f32s(&mc["targets"]),
        k,
    );
    close(m.accuracy, &mc["accuracy"], "multiclass accuracy");
    close(
        m.auroc_macro.unwrap(),
        &mc["auroc_macro"],
        "multiclass one-vs-rest macro AUROC",
    );
}
