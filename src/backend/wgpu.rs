//! Vulkan and Metal adapters (`--device vulkan[:N]`, `--device metal`): listed here, opened
//! once per process through cubecl-wgpu with the graphics API named on the command line.
//!
//! cubecl-wgpu picks adapters itself and panics when an index or a driver is missing; listing
//! them first turns those cases into one line that says what is there and what to install.
//! A software adapter (Mesa's lavapipe, `llvmpipe`) is a valid device, never a silent one:
//! opening it prints a note that its speed is a CPU's.

use super::BackendError;
use burn::backend::wgpu::{graphics, init_setup, RuntimeOptions, WgpuDevice};
use std::collections::HashMap;
use std::sync::Mutex;

/// A graphics API of wgpu that marlin runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    Vulkan,
    Metal,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Self::Vulkan => "vulkan",
            Self::Metal => "metal",
        }
    }

    fn backends(self) -> ::wgpu::Backends {
        match self {
            Self::Vulkan => ::wgpu::Backends::VULKAN,
            Self::Metal => ::wgpu::Backends::METAL,
        }
    }

    fn install_hint(self) -> &'static str {
        match self {
            Self::Vulkan => {
                "install your GPU's Vulkan driver (or, for the software GPU, Mesa's lavapipe: \
                 `apt-get install mesa-vulkan-drivers`)"
            }
            Self::Metal => "Metal needs macOS on Apple Silicon or a Metal-capable Mac GPU",
        }
    }
}

/// One adapter as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    pub name: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `VirtualGpu`, `Cpu` (software) or `Other`.
    pub kind: String,
    /// A software rasteriser on the CPU (lavapipe, SwiftShader).
    pub software: bool,
    /// cubecl-wgpu's name for it.
    device: Option<WgpuDevice>,
}

impl std::fmt::Display for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.kind)
    }
}

/// The adapters of `api`, hardware GPUs first (discrete, integrated, virtual), software ones
/// last: `vulkan:0` is the best GPU the machine has.
pub fn adapters(api: Api) -> Vec<Adapter> {
    use ::wgpu::DeviceType;
    let instance = ::wgpu::Instance::new(::wgpu::InstanceDescriptor {
        backends: api.backends(),
        ..::wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let found = burn_cubecl::cubecl::future::block_on(instance.enumerate_adapters(api.backends()));
    let rank = |t: DeviceType| match t {
        DeviceType::DiscreteGpu => 0,
        DeviceType::IntegratedGpu => 1,
        DeviceType::VirtualGpu => 2,
        DeviceType::Cpu => 3,
        DeviceType::Other => 4,
    };
    let mut infos: Vec<_> = found.iter().map(|a| a.get_info()).collect();
    // Stable: within a kind, the driver's order, which is cubecl-wgpu's index.
    infos.sort_by_key(|i| rank(i.device_type));
    let mut seen: HashMap<u8, usize> = HashMap::new();
    infos
        .into_iter()
        .map(|info| {
            let k = seen.entry(rank(info.device_type)).or_default();
            let nth = *k;
            *k += 1;
            let device = match info.device_type {
                DeviceType::DiscreteGpu => Some(WgpuDevice::DiscreteGpu(nth)),
                DeviceType::IntegratedGpu => Some(WgpuDevice::IntegratedGpu(nth)),
                DeviceType::VirtualGpu => Some(WgpuDevice::VirtualGpu(nth)),
                // cubecl-wgpu opens the first software adapter only.
                DeviceType::Cpu => (nth == 0).then_some(WgpuDevice::Cpu),
                DeviceType::Other => None,
            };
            Adapter {
                name: info.name,
                kind: format!("{:?}", info.device_type),
                software: info.device_type == DeviceType::Cpu,
                device,
            }
        })
        .collect()
}

/// Devices opened so far, by API and index.
static OPEN: Mutex<Option<HashMap<(Api, usize), WgpuDevice>>> = Mutex::new(None);

/// The `index`-th adapter of `api` ([`adapters`]' order) as a burn device, set up with that
/// graphics API on first use; a note on standard error when it is a software adapter.
pub fn device(api: Api, index: usize) -> Result<WgpuDevice, BackendError> {
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    let open = open.get_or_insert_with(HashMap::new);
    if let Some(d) = open.get(&(api, index)) {
        return Ok(d.clone());
    }
    let list = adapters(api);
    let name = api.name();
    let spec = match api {
        Api::Vulkan => format!("{name}:{index}"),
        Api::Metal => name.to_string(),
    };
    if list.is_empty() {
        return Err(BackendError::NoAdapter(format!(
            "--device {spec}: no {name} adapter on this machine; {}, or use --device cpu",
            api.install_hint()
        )));
    }
    let described: Vec<String> = list
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{name}:{i} {a}"))
        .collect();
    let Some(adapter) = list.get(index) else {
        return Err(BackendError::NoAdapter(format!(
            "--device {spec}: there are {} {name} adapter(s): {}",
            list.len(),
            described.join(", ")
        )));
    };
    let Some(device) = adapter.device.clone() else {
        return Err(BackendError::NoAdapter(format!(
            "--device {spec}: {adapter} cannot be opened (a second software adapter, or one of \
             an unknown kind); adapters: {}",
            described.join(", ")
        )));
    };
    if adapter.software {
        eprintln!(
            "note: --device {spec} is {adapter}, a software GPU on the CPU: the GPU code path, at \
             a CPU's speed"
        );
    }
    match api {
        Api::Vulkan => {
            init_setup::<graphics::Vulkan>(&device, RuntimeOptions::default());
        }
        Api::Metal => {
            init_setup::<graphics::Metal>(&device, RuntimeOptions::default());
        }
    }
    open.insert((api, index), device.clone());
    Ok(device)
}
