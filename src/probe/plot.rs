//! Training curves as a PNG (`curves.png` of a run): losses on the left, validation AUC and
//! accuracy on the right, per epoch.

use super::train::EpochLog;
use plotters::prelude::*;
use std::path::Path;

/// DejaVu Sans Mono (Bitstream Vera license, LICENSES/dejavu-fonts.md), for the labels.
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");

fn register() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The embedded font is a valid TrueType file; if it were not, labels would be missing
        // and plotting would report the error.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

fn draw(epochs: &[EpochLog], path: &Path) -> DrawResult<()> {
    let root = BitMapBackend::new(path, (1100, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);
    let last = epochs.last().map_or(1, |e| e.epoch).max(2) as f64;
    let max_loss = epochs
        .iter()
        .flat_map(|e| [e.train_loss, e.val_loss])
        .filter(|v| v.is_finite())
        .fold(0f64, f64::max)
        .max(1e-6)
        * 1.05;
    let mut c = ChartBuilder::on(&left)
        .caption("loss", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(1f64..last, 0f64..max_loss)?;
    c.configure_mesh().x_desc("epoch").draw()?;
    for (name, color, get) in [
        (
            "train",
            BLUE,
            (|e: &EpochLog| e.train_loss) as fn(&EpochLog) -> f64,
        ),
        ("validation", RED, |e: &EpochLog| e.val_loss),
    ] {
        c.draw_series(LineSeries::new(
            epochs.iter().map(|e| (e.epoch as f64, get(e))),
            color.stroke_width(2),
        ))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;

    let mut c = ChartBuilder::on(&right)
        .caption("validation", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(1f64..last, 0f64..1f64)?;
    c.configure_mesh().x_desc("epoch").draw()?;
    c.draw_series(LineSeries::new(
        epochs
            .iter()
            .filter_map(|e| e.val_auc.map(|a| (e.epoch as f64, a))),
        GREEN.stroke_width(2),
    ))?
    .label("AUC")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(2)));
    c.draw_series(LineSeries::new(
        epochs.iter().map(|e| (e.epoch as f64, e.val_accuracy)),
        MAGENTA.stroke_width(2),
    ))?
    .label("accuracy")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA.stroke_width(2)));
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

/// The curves PNG could not be drawn or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {msg}")]
pub struct PlotError {
    pub path: String,
    pub msg: String,
}

/// Draw the curves of `epochs` into `path` (PNG), written under a temp name and renamed.
pub fn curves(epochs: &[EpochLog], path: &Path) -> Result<(), PlotError> {
    register();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The temp name keeps the .png ending: the backend picks the format from it.
    let tmp = path.with_file_name(format!(".tmp{}.{name}", std::process::id()));
    let r = draw(epochs, &tmp)
        .map_err(|e| e.to_string())
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(|msg| PlotError {
        path: path.display().to_string(),
        msg,
    })
}
