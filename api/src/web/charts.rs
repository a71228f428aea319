//! Charts drawn on the server as SVG: no script, no library, the page's colours (CSS classes).
//! Each is an image with a text alternative that says what it shows, and the figures it is drawn
//! from are the page's own.

use maud::{html, Markup, PreEscaped};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;

const W: f64 = 600.0;
const H: f64 = 200.0;
const LEFT: f64 = 8.0;
const BOTTOM: f64 = 24.0;
const TOP: f64 = 16.0;

fn number(value: Decimal) -> f64 {
    value.to_f64().unwrap_or(0.0)
}

/// Where a value sits between `low` and `high`, on the chart's height.
fn y_of(value: f64, low: f64, high: f64) -> f64 {
    let span = if high > low { high - low } else { 1.0 };
    TOP + (H - TOP - BOTTOM) * (1.0 - (value - low) / span)
}

/// The zero line at `base`, and the first and last labels of `points` under it.
fn axis(base: f64, points: &[(String, Decimal)]) -> Markup {
    let first = points.first().map(|(label, _)| label.as_str()).unwrap_or_default();
    let last = points.last().map(|(label, _)| label.as_str()).unwrap_or_default();
    html! {
        line class="axis" x1=(LEFT) x2=(W - LEFT) y1=(format!("{base:.1}")) y2=(format!("{base:.1}")) {}
        text x=(LEFT) y=(H - 6.0) { (first) }
        text x=(W - LEFT) y=(H - 6.0) text-anchor="end" { (last) }
    }
}

/// A line over days: `points` are (label, value); the first and last labels are written under it.
pub fn line(caption: &str, alternative: &str, points: &[(String, Decimal)]) -> Markup {
    let values: Vec<f64> = points.iter().map(|(_, value)| number(*value)).collect();
    let high = values.iter().copied().fold(0.0_f64, f64::max);
    let low = values.iter().copied().fold(0.0_f64, f64::min);
    let step = if values.len() > 1 {
        (W - 2.0 * LEFT) / (values.len() - 1) as f64
    } else {
        0.0
    };
    let coordinates: Vec<(f64, f64)> = values
        .iter()
        .enumerate()
        .map(|(i, value)| (LEFT + step * i as f64, y_of(*value, low, high)))
        .collect();
    let path: String = coordinates
        .iter()
        .enumerate()
        .map(|(i, (x, y))| format!("{}{x:.1},{y:.1}", if i == 0 { "M" } else { " L" }))
        .collect();
    let base = y_of(0.0, low, high);
    let area = match (coordinates.first(), coordinates.last()) {
        (Some((first, _)), Some((last, _))) => format!("{path} L{last:.1},{base:.1} L{first:.1},{base:.1} Z"),
        _ => String::new(),
    };
    html! {
        figure class="chart" {
            figcaption { (caption) }
            svg viewBox={ "0 0 " (W) " " (H) } role="img" aria-label=(alternative) data-derived="drawn from the figures named in its title" preserveAspectRatio="none" {
                title { (alternative) }
                (axis(base, points))
                path class="area" d=(area) {}
                path class="line" d=(path) {}
            }
        }
    }
}

/// Horizontal bars, one per `(label, value, written, source)`, with the value written beside each
/// (marked as the API's `month_to_date_net` of `source`).
pub fn bars(caption: &str, alternative: &str, bars: &[(String, Decimal, String, String)]) -> Markup {
    let high = bars.iter().map(|(_, value, _, _)| number(*value)).fold(0.0_f64, f64::max);
    let row = 28.0;
    let height = (bars.len().max(1) as f64) * row + 8.0;
    let label_width = 150.0;
    let room = W - label_width - 120.0;
    html! {
        figure class="chart" {
            figcaption { (caption) }
            svg viewBox={ "0 0 " (W) " " (height) } role="img" aria-label=(alternative) data-derived="drawn from the figures named in its title" {
                title { (alternative) }
                @for (i, (label, value, written, source)) in bars.iter().enumerate() {
                    @let y = 4.0 + row * i as f64;
                    @let length = if high > 0.0 { (number(*value).max(0.0) / high) * room } else { 0.0 };
                    text x="0" y=(format!("{:.1}", y + 17.0)) { (label) }
                    rect class="bar" x=(label_width) y=(format!("{y:.1}")) width=(format!("{:.1}", length.max(1.0))) height="20" rx="3" {}
                    text x=(format!("{:.1}", label_width + length + 6.0)) y=(format!("{:.1}", y + 17.0)) data-api=(source) data-field="/month_to_date_net" { (written) }
                }
            }
        }
    }
}

/// Vertical bars over days (revenue per day).
pub fn columns(caption: &str, alternative: &str, points: &[(String, Decimal)]) -> Markup {
    let values: Vec<f64> = points.iter().map(|(_, value)| number(*value)).collect();
    let high = values.iter().copied().fold(0.0_f64, f64::max);
    let low = values.iter().copied().fold(0.0_f64, f64::min);
    let slot = (W - 2.0 * LEFT) / values.len().max(1) as f64;
    let base = y_of(0.0, low, high);
    let mut rects = String::new();
    for (i, value) in values.iter().enumerate() {
        let y = y_of(*value, low, high);
        let (top, height) = if y < base { (y, base - y) } else { (base, y - base) };
        rects.push_str(&format!(
            r#"<rect class="bar" x="{:.1}" y="{top:.1}" width="{:.1}" height="{:.1}"></rect>"#,
            LEFT + slot * i as f64 + slot * 0.15,
            slot * 0.7,
            height.max(0.5)
        ));
    }
    html! {
        figure class="chart" {
            figcaption { (caption) }
            svg viewBox={ "0 0 " (W) " " (H) } role="img" aria-label=(alternative) data-derived="drawn from the figures named in its title" preserveAspectRatio="none" {
                title { (alternative) }
                (axis(base, points))
                (PreEscaped(rects))
            }
        }
    }
}
