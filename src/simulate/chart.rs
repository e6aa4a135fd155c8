//! A PNG of per-server utilization over time (plotters), for a person to look at.
//! Text uses the `DejaVu` Sans font from Debian's `fonts-dejavu-core`.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use super::fleet::{Algorithm, Series};
use super::scenario::Scenario;

pub const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("no font for the chart: install Debian's fonts-dejavu-core (looked in {0})")]
    NoFont(String),
    #[error("cannot draw the chart {file}: {message}")]
    Draw { file: String, message: String },
}

fn font() -> Result<(), ChartError> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let bytes = FONT_PATHS
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or_else(|| FONT_PATHS.join(", "))?;
        // Registered once per process and kept for its lifetime, as plotters requires.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "unreadable font".to_string())
    })
    .clone()
    .map_err(ChartError::NoFont)
}

pub fn draw(
    file: &Path,
    sc: &Scenario,
    algorithm: Algorithm,
    series: &Series,
) -> Result<(), ChartError> {
    font()?;
    let fail = |e: &dyn std::fmt::Display| ChartError::Draw {
        file: file.display().to_string(),
        message: e.to_string(),
    };
    let root = BitMapBackend::new(file, (1200, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let end = series.times.last().copied().unwrap_or(1).max(1);
    let top = series
        .servers
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|x| x.is_finite())
        .fold(1.0f64, f64::max);
    let title = format!(
        "{} — {} (utilization per server, fleet U dashed)",
        sc.name,
        format!("{algorithm:?}").to_lowercase()
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0u64..end, 0f64..top * 1.05)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("utilization")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| fail(&e))?;
    for (k, (name, values)) in series.servers.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let points: Vec<(u64, f64)> = series
            .times
            .iter()
            .zip(values)
            .filter(|(_, v)| v.is_finite())
            .map(|(t, v)| (*t, *v))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    let fleet: Vec<(u64, f64)> = series
        .times
        .iter()
        .copied()
        .zip(series.fleet.iter().copied())
        .collect();
    chart
        .draw_series(DashedLineSeries::new(fleet, 6, 4, BLACK.stroke_width(2)))
        .map_err(|e| fail(&e))?
        .label("fleet U")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}
