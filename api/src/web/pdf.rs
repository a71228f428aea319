//! Invoices as PDF, written in Rust (`pdf-writer`): A4 pages in the standard Helvetica, which every
//! PDF reader has, so nothing is embedded. The figures are the API's (`http::types::Invoice`), as
//! written there; text outside the Latin-1 range is shown as `?` (the standard fonts have no more).

use pdf_writer::{Content, Finish, Name, Pdf, Rect, Ref, Str, TextStr};

use crate::http::types::Invoice;

const WIDTH: f32 = 595.0;
const HEIGHT: f32 = 842.0;
const MARGIN: f32 = 50.0;
const LINE: f32 = 16.0;
const REGULAR: Name<'static> = Name(b"F1");
const BOLD: Name<'static> = Name(b"F2");

/// Widths of Helvetica's printable ASCII characters (space to `~`), in thousandths of the size.
const HELVETICA: [u16; 95] = [
    278, 278, 355, 556, 556, 889, 667, 191, 333, 333, 389, 584, 278, 333, 278, 278, 556, 556, 556, 556, 556, 556, 556, 556, 556, 556, 278,
    278, 584, 584, 584, 556, 1015, 667, 667, 722, 722, 667, 611, 778, 722, 278, 500, 667, 556, 833, 722, 778, 667, 778, 722, 667, 611, 722,
    667, 944, 667, 667, 611, 278, 278, 278, 469, 556, 333, 556, 556, 500, 556, 556, 278, 556, 556, 222, 222, 500, 222, 833, 556, 556, 556,
    556, 333, 500, 278, 556, 500, 722, 500, 500, 500, 334, 260, 334, 584,
];

/// `text` in the fonts' encoding (WinAnsi, which is Latin-1 from 0xA0 on).
fn encoded(text: &str) -> Vec<u8> {
    text.chars()
        .map(|c| match c as u32 {
            0x20..=0x7e | 0xa0..=0xff => c as u32 as u8,
            _ => b'?',
        })
        .collect()
}

fn width(text: &str, size: f32) -> f32 {
    let thousandths: u32 = text
        .chars()
        .map(|c| match c as u32 {
            code @ 0x20..=0x7e => u32::from(HELVETICA[(code - 0x20) as usize]),
            _ => 556,
        })
        .sum();
    thousandths as f32 * size / 1000.0
}

/// Text cut to fit `room` points, with an ellipsis when cut.
fn fitted(text: &str, size: f32, room: f32) -> String {
    if width(text, size) <= room {
        return text.to_string();
    }
    let mut cut: String = text.to_string();
    while !cut.is_empty() && width(&format!("{cut}..."), size) > room {
        cut.pop();
    }
    format!("{cut}...")
}

/// Pages being written: each a content stream, a new one when the current is full.
struct Pages {
    done: Vec<Content>,
    current: Content,
    y: f32,
}

impl Pages {
    fn new() -> Pages {
        Pages {
            done: Vec::new(),
            current: Content::new(),
            y: HEIGHT - MARGIN,
        }
    }

    /// Room for `lines` more lines, or a new page.
    fn need(&mut self, lines: f32) {
        if self.y - lines * LINE < MARGIN + LINE {
            let full = std::mem::replace(&mut self.current, Content::new());
            self.done.push(full);
            self.y = HEIGHT - MARGIN;
        }
    }

    fn text(&mut self, x: f32, font: Name, size: f32, text: &str) {
        let bytes = encoded(text);
        self.current
            .begin_text()
            .set_font(font, size)
            .next_line(x, self.y)
            .show(Str(&bytes))
            .end_text();
    }

    /// Text ending at `right`.
    fn right(&mut self, right: f32, font: Name, size: f32, text: &str) {
        let x = right - width(text, size);
        self.text(x, font, size, text);
    }

    fn rule(&mut self) {
        self.current
            .set_line_width(0.5)
            .move_to(MARGIN, self.y - 4.0)
            .line_to(WIDTH - MARGIN, self.y - 4.0)
            .stroke();
    }

    fn down(&mut self, lines: f32) {
        self.y -= lines * LINE;
    }

    fn finish(mut self) -> Vec<Content> {
        self.done.push(self.current);
        self.done
    }
}

/// Columns of the lines' table: where each figure ends.
const HOURS_END: f32 = 340.0;
const NET_END: f32 = 445.0;
const TAX_END: f32 = WIDTH - MARGIN;

/// The invoice as a PDF document.
pub fn invoice(invoice: &Invoice, customer: &str) -> Vec<u8> {
    let mut pages = Pages::new();
    pages.text(MARGIN, BOLD, 20.0, &format!("Invoice {}", invoice.number));
    pages.down(2.0);
    for line in [
        customer.to_string(),
        format!(
            "Period {} to {}",
            invoice.period_start.format("%Y-%m-%d %H:%M UTC"),
            invoice.period_end.format("%Y-%m-%d %H:%M UTC")
        ),
        format!("Issued {}", invoice.issued_at.format("%Y-%m-%d %H:%M UTC")),
        format!("All amounts in {}", invoice.currency),
    ] {
        pages.text(MARGIN, REGULAR, 11.0, &line);
        pages.down(1.0);
    }
    pages.down(1.0);
    pages.text(MARGIN, BOLD, 10.0, "Description");
    pages.right(HOURS_END, BOLD, 10.0, "Hours");
    pages.right(NET_END, BOLD, 10.0, "Net");
    pages.right(TAX_END, BOLD, 10.0, "Tax");
    pages.rule();
    pages.down(1.25);
    for line in &invoice.lines {
        pages.need(1.0);
        let description = fitted(&line.description, 10.0, HOURS_END - MARGIN - 50.0);
        pages.text(MARGIN, REGULAR, 10.0, &description);
        if let Some(hours) = line.hours {
            pages.right(HOURS_END, REGULAR, 10.0, &hours.to_string());
        }
        pages.right(NET_END, REGULAR, 10.0, &line.net.0);
        pages.right(TAX_END, REGULAR, 10.0, &line.tax.0);
        pages.down(1.0);
    }
    pages.need(4.0 + invoice.taxes.len() as f32);
    pages.rule();
    pages.down(1.5);
    for tax in &invoice.taxes {
        let percent = tax
            .rate
            .parse::<rust_decimal::Decimal>()
            .map(|rate| format!("{}%", (rate * rust_decimal::Decimal::ONE_HUNDRED).normalize()))
            .unwrap_or_else(|_| tax.rate.clone());
        pages.text(MARGIN, REGULAR, 10.0, &format!("Tax at {percent} on {}", tax.net.0));
        pages.right(TAX_END, REGULAR, 10.0, &tax.tax.0);
        pages.down(1.0);
    }
    for (label, figure, font) in [
        ("Net", &invoice.display.net.0, REGULAR),
        ("Tax", &invoice.display.tax.0, REGULAR),
        ("Total", &invoice.display.total.0, BOLD),
    ] {
        pages.text(NET_END - 60.0, font, 11.0, label);
        pages.right(TAX_END, font, 11.0, &format!("{figure} {}", invoice.currency));
        pages.down(1.0);
    }
    if !invoice.credit_notes.is_empty() {
        pages.need(3.0);
        pages.down(1.0);
        pages.text(MARGIN, BOLD, 12.0, "Credit notes");
        pages.down(1.5);
        for note in &invoice.credit_notes {
            pages.need(1.0);
            let text = format!("{} ({}): {}", note.number, note.issued_at.format("%Y-%m-%d"), note.reason);
            pages.text(MARGIN, REGULAR, 10.0, &fitted(&text, 10.0, NET_END - MARGIN - 20.0));
            pages.right(TAX_END, REGULAR, 10.0, &format!("-{} {}", note.total.0, invoice.currency));
            pages.down(1.0);
        }
    }
    write(pages.finish(), &format!("Invoice {}", invoice.number))
}

/// The document around its pages' content.
fn write(contents: Vec<Content>, title: &str) -> Vec<u8> {
    let mut pdf = Pdf::new();
    let catalog = Ref::new(1);
    let tree = Ref::new(2);
    let regular = Ref::new(3);
    let bold = Ref::new(4);
    let info = Ref::new(5);
    let first = 6;
    let page_ids: Vec<Ref> = (0..contents.len()).map(|i| Ref::new(first + 2 * i as i32)).collect();
    pdf.catalog(catalog).pages(tree);
    pdf.pages(tree).kids(page_ids.iter().copied()).count(page_ids.len() as i32);
    for (content, page_id) in contents.into_iter().zip(&page_ids) {
        let content_id = Ref::new(page_id.get() + 1);
        let mut page = pdf.page(*page_id);
        page.media_box(Rect::new(0.0, 0.0, WIDTH, HEIGHT));
        page.parent(tree);
        page.contents(content_id);
        let mut resources = page.resources();
        resources.fonts().pair(REGULAR, regular).pair(BOLD, bold);
        resources.finish();
        page.finish();
        pdf.stream(content_id, &content.finish());
    }
    pdf.type1_font(regular)
        .base_font(Name(b"Helvetica"))
        .encoding_predefined(Name(b"WinAnsiEncoding"));
    pdf.type1_font(bold)
        .base_font(Name(b"Helvetica-Bold"))
        .encoding_predefined(Name(b"WinAnsiEncoding"));
    pdf.document_info(info).title(TextStr(title)).producer(TextStr("billing"));
    pdf.finish()
}
