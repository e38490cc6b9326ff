//! The module tree is the key map.
//!
//! Every parameter is named once: by the field that holds it in the module tree (`Marlin` →
//! `Encoder` → `Block` → `Attention` → `qkv`). Its name in the official checkpoints is that
//! burn path after the short table [`MARLIN_RENAMES`] and burn's two layout conventions:
//! a `Linear` weight is `[in, out]` here and `[out, in]` in PyTorch, and a `LayerNorm`'s
//! `gamma`/`beta` are PyTorch's `weight`/`bias`. One parameter, the tubelet embedding, is a
//! `Conv3d` in the reference and a `Linear` over flattened tubelets here ([`KeyMap::reshaped`]).
//!
//! [`KeyMap::slots`] walks a module (lazily built, nothing allocated) and lists each parameter
//! with its official key and PyTorch shape: the list checkpoints are checked against, counted
//! and initialised from. [`KeyMap::load`] fills a module from a [`StateDict`] in one walk and
//! [`KeyMap::export`] writes one back, so adding a parameter to a module is the whole change.

use super::host::{to_host, transpose2d, HostTensor, StateDict, WeightsError};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor, TensorData};

/// Burn paths of MARLIN's module tree that differ from the reference's names, as
/// (ours, reference) path fragments. Everything else is named alike.
pub const MARLIN_RENAMES: &[(&str, &str)] = &[
    (".patch_embedding.", ".patch_embedding.projection."),
    (".pos_embedding.", ".pos_embedding.emb."),
    (".mlp.fc1.", ".mlp.layers.0.linear."),
    (".mlp.fc2.", ".mlp.layers.1.linear."),
    ("discriminator.fc1.", "discriminator.layers.0.linear."),
    ("discriminator.fc2.", "discriminator.layers.1.linear."),
];

/// How a parameter is laid out in the official checkpoint, relative to ours.
#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    /// The same shape and order.
    Same,
    /// A `Linear` weight: ours `[in, out]`, PyTorch `[out, in]`.
    Transposed,
    /// A Linear that is a Conv in the reference: ours `[in, out]`, PyTorch `[out, ...]` with
    /// the input dimensions in the Conv's order (flattened `in` = their product).
    Conv,
}

/// One parameter of a module tree under its official name.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    /// Path in the module tree (`encoder.blocks.0.mlp.fc1.weight`).
    pub path: String,
    /// Official key (`encoder.blocks.0.mlp.layers.0.linear.weight`).
    pub key: String,
    /// Shape in the official checkpoint (PyTorch layout).
    pub shape: Vec<usize>,
    pub layout: Layout,
    /// The module type holding the parameter (`Linear`, `LayerNorm`, `Attention`...).
    pub module: String,
    /// Part of a Linear that the reference has as a Conv (weight and bias).
    pub conv: bool,
}

impl Slot {
    /// The parameter's own name (`weight`, `q_bias`, `pos_embedding`...).
    pub fn name(&self) -> &str {
        self.path.rsplit('.').next().unwrap_or(&self.path)
    }
}

/// Burn path -> official key and layout, for one model family.
#[derive(Debug, Clone)]
pub struct KeyMap {
    renames: &'static [(&'static str, &'static str)],
    /// (path, official shape) of Linear weights stored as Conv weights.
    reshaped: Vec<(String, Vec<usize>)>,
}

impl KeyMap {
    pub fn new(renames: &'static [(&'static str, &'static str)]) -> Self {
        Self {
            renames,
            reshaped: Vec::new(),
        }
    }

    /// The Linear weight at `path` is stored as a Conv weight of `shape` (`[out, ...]`).
    pub fn reshaped(mut self, path: impl Into<String>, shape: Vec<usize>) -> Self {
        self.reshaped.push((path.into(), shape));
        self
    }

    fn slot(&self, path: &[String], module: &str, burn_shape: &[usize]) -> Slot {
        let name = path.last().map(String::as_str).unwrap_or_default();
        let mut segs = path.to_vec();
        if module == "LayerNorm" {
            if let Some(last) = segs.last_mut() {
                match name {
                    "gamma" => *last = "weight".into(),
                    "beta" => *last = "bias".into(),
                    _ => {}
                }
            }
        }
        let burn_path = path.join(".");
        let parent = &path[..path.len().saturating_sub(1)];
        let conv = self
            .reshaped
            .iter()
            .any(|(p, _)| p.rsplit_once('.').map(|(m, _)| m) == Some(parent.join(".").as_str()));
        // Fragments match whole segments: the key is padded with dots on both ends.
        let mut key = format!(".{}.", segs.join("."));
        for (ours, theirs) in self.renames {
            key = key.replacen(ours, theirs, 1);
        }
        let key = key.trim_matches('.').to_string();
        let (shape, layout) = if module == "Linear" && name == "weight" {
            match self.reshaped.iter().find(|(p, _)| *p == burn_path) {
                Some((_, s)) => (s.clone(), Layout::Conv),
                None => (
                    burn_shape.iter().rev().copied().collect(),
                    Layout::Transposed,
                ),
            }
        } else {
            (burn_shape.to_vec(), Layout::Same)
        };
        Slot {
            path: burn_path,
            key,
            shape,
            layout,
            module: module.to_string(),
            conv,
        }
    }

    /// Every float parameter of `module` with its official key and shape, in visit order.
    /// Reads shapes only: a lazily initialised module stays unallocated.
    pub fn slots<B: Backend, M: Module<B>>(&self, module: &M) -> Vec<Slot> {
        self.slots_under(module, &[])
    }

    /// [`KeyMap::slots`] of a submodule that sits at `prefix` in the tree.
    pub fn slots_under<B: Backend, M: Module<B>>(&self, module: &M, prefix: &[&str]) -> Vec<Slot> {
        let mut v = Walk::new(self, prefix);
        module.visit(&mut v);
        v.slots
    }

    /// Fill every parameter of `module` from `sd` (official keys, PyTorch layout). A missing
    /// key or a shape mismatch is an error naming the file, the key and both shapes.
    pub fn load<B: Backend, M: Module<B>>(
        &self,
        module: M,
        sd: &StateDict,
        config: &str,
    ) -> Result<M, WeightsError> {
        let mut m = Walk::new(self, &[]);
        m.load = Some((sd, config));
        let module = module.map(&mut m);
        match m.error {
            Some(e) => Err(e),
            None => Ok(module),
        }
    }

    /// Every parameter of `module` into `sd` under its official key, PyTorch layout.
    pub fn export<B: Backend, M: Module<B>>(&self, module: &M, sd: &mut StateDict) {
        let mut v = Walk::new(self, &[]);
        v.export = Some(sd);
        module.visit(&mut v);
    }
}

/// One walk over a module tree: the path so far and what to do at each parameter.
struct Walk<'a> {
    map: &'a KeyMap,
    path: Vec<String>,
    modules: Vec<String>,
    slots: Vec<Slot>,
    load: Option<(&'a StateDict, &'a str)>,
    export: Option<&'a mut StateDict>,
    error: Option<WeightsError>,
}

impl<'a> Walk<'a> {
    fn new(map: &'a KeyMap, prefix: &[&str]) -> Self {
        Self {
            map,
            path: prefix.iter().map(|s| s.to_string()).collect(),
            modules: Vec::new(),
            slots: Vec::new(),
            load: None,
            export: None,
            error: None,
        }
    }

    fn enter(&mut self, name: &str, container: &str) {
        self.path.push(name.to_string());
        let module = container.split_once(':').map_or(container, |(_, t)| t);
        self.modules.push(module.to_string());
    }

    fn exit(&mut self) {
        self.path.pop();
        self.modules.pop();
    }

    fn current(&self, burn_shape: &[usize]) -> Slot {
        let module = self.modules.last().map(String::as_str).unwrap_or_default();
        self.map.slot(&self.path, module, burn_shape)
    }
}

impl<B: Backend> ModuleVisitor<B> for Walk<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let slot = self.current(&param.lazy_shape().to_vec());
        if let Some(sd) = self.export.as_deref_mut() {
            let mut t = to_host(&param.val());
            if slot.layout != Layout::Same {
                t = transpose(&t);
                t.shape = slot.shape.clone();
            }
            sd.tensors.insert(slot.key.clone(), t);
        }
        self.slots.push(slot);
    }
}

impl<B: Backend> ModuleMapper<B> for Walk<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some((sd, config)) = self.load else {
            return param;
        };
        if self.error.is_some() {
            return param;
        }
        let burn_shape = param.lazy_shape().to_vec();
        let slot = self.current(&burn_shape);
        let host = match sd.tensors.get(&slot.key) {
            None => {
                self.error = Some(WeightsError::Missing {
                    file: sd.source.clone(),
                    key: slot.key,
                    expected: slot.shape,
                    hint: String::new(),
                });
                return param;
            }
            Some(t) if t.shape != slot.shape => {
                self.error = Some(WeightsError::Shape {
                    file: sd.source.clone(),
                    key: slot.key,
                    config: config.to_string(),
                    expected: slot.shape,
                    found: t.shape.clone(),
                });
                return param;
            }
            Some(t) => t,
        };
        let data = match slot.layout {
            Layout::Same => host.data.clone(),
            Layout::Transposed | Layout::Conv => {
                let out = host.shape[0].max(1);
                transpose2d(&host.data, out, host.numel() / out)
            }
        };
        let tensor = Tensor::from_data(TensorData::new(data, burn_shape), &param.lazy_device());
        let id = param.id;
        // Keeps the skeleton's id, device and require-grad setting (the fixed position
        // tables stay frozen).
        param.transform_for_load(tensor, id)
    }
}

/// A 2-D transpose of the first dimension against the rest (`[a, ...]` -> `[rest, a]`).
fn transpose(t: &HostTensor) -> HostTensor {
    let rows = t.shape.first().copied().unwrap_or(1).max(1);
    let cols = t.numel() / rows;
    HostTensor::new(vec![cols, rows], transpose2d(&t.data, rows, cols))
}
