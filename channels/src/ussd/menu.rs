//! The menus: data files in Azerbaijani, Russian and English (`channels/menus/*.toml`, compiled
//! in), rendered into screens that fit one USSD string each. A screen longer than that is cut
//! into pages at line ends (at spaces inside a line too long on its own), each page ending in
//! "0 Next" and, after the first, "00 Back"; choices keep their numbers on every page.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Deserialize;

use super::text;

/// Language codes as the wallet stores them: 0 Azerbaijani, 1 Russian, 2 English.
pub const LANGUAGES: [u8; 3] = [0, 1, 2];

/// The items of the menus, in the order they are numbered.
pub const GUEST_ITEMS: [&str; 2] = ["register", "language"];
pub const MAIN_ITEMS: [&str; 7] =
    ["balance", "send", "cash_code", "statement", "change_pin", "language", "last"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Texts {
    pub name: String,
    pub next: String,
    pub back: String,
    pub items: HashMap<String, String>,
    pub text: HashMap<String, String>,
    pub errors: HashMap<String, String>,
}

const FILES: [(u8, &str); 3] = [
    (0, include_str!("../../menus/az.toml")),
    (1, include_str!("../../menus/ru.toml")),
    (2, include_str!("../../menus/en.toml")),
];

/// The texts of `language` (English for an unknown code).
pub fn texts(language: u8) -> &'static Texts {
    static ALL: OnceLock<Vec<Texts>> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        FILES
            .iter()
            .map(|(_, source)| match toml::from_str(source) {
                Ok(texts) => texts,
                // The files are compiled in and checked by the tests below: a broken one is a
                // build defect, not an input.
                Err(error) => panic!("menus: {error}"),
            })
            .collect()
    });
    let index = FILES.iter().position(|(code, _)| *code == language).unwrap_or(2);
    &all[index]
}

impl Texts {
    /// Text `key` with `{name}` placeholders filled; the key itself if missing (a test checks
    /// that none is).
    pub fn fill(&self, key: &str, values: &[(&str, &str)]) -> String {
        let template = self.text.get(key).map(String::as_str).unwrap_or(key);
        fill(template, values)
    }

    /// The text for an engine refusal code.
    pub fn error(&self, code: &str, values: &[(&str, &str)]) -> String {
        let key = if code.starts_with("limit_") && !self.errors.contains_key(code) { "limit" } else { code };
        match self.errors.get(key) {
            Some(template) => fill(template, values),
            None => fill(&self.errors["other"], &[("code", code)]),
        }
    }

    /// A numbered menu: the title, then "n item" lines.
    pub fn menu(&self, title_key: &str, items: &[&str]) -> String {
        let mut screen = self.fill(title_key, &[]);
        for (i, item) in items.iter().enumerate() {
            let label = self.items.get(*item).map(String::as_str).unwrap_or(item);
            screen.push_str(&format!("\n{} {label}", i + 1));
        }
        screen
    }

    /// The language menu: every language in its own name.
    pub fn language_menu(&self) -> String {
        let mut screen = self.fill("language_title", &[]);
        for (i, code) in LANGUAGES.iter().enumerate() {
            screen.push_str(&format!("\n{} {}", i + 1, texts(*code).name));
        }
        screen
    }
}

fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = template.to_owned();
    for (name, value) in values {
        out = out.replace(&format!("{{{name}}}"), value);
    }
    out
}

/// Cuts `screen` into pages that fit one USSD string each, with the paging lines of `texts`.
pub fn pages(screen: &str, texts: &Texts) -> Vec<String> {
    if text::fits(screen) {
        return vec![screen.to_owned()];
    }
    // Lines too long on their own are cut at spaces (or anywhere, for a word too long).
    let budget = |page: &str, first: bool| {
        let mut candidate = page.to_owned();
        candidate.push('\n');
        candidate.push_str(&texts.next);
        if !first {
            candidate.push('\n');
            candidate.push_str(&texts.back);
        }
        text::fits(&candidate)
    };
    let mut pieces: Vec<String> = Vec::new();
    for line in screen.lines() {
        if budget(line, false) {
            pieces.push(line.to_owned());
            continue;
        }
        let mut current = String::new();
        for word in line.split(' ') {
            let candidate = if current.is_empty() { word.to_owned() } else { format!("{current} {word}") };
            if budget(&candidate, false) {
                current = candidate;
            } else {
                if !current.is_empty() {
                    pieces.push(std::mem::take(&mut current));
                }
                let mut chunk = String::new();
                for c in word.chars() {
                    chunk.push(c);
                    if !budget(&chunk, false) {
                        chunk.pop();
                        pieces.push(std::mem::take(&mut chunk));
                        chunk.push(c);
                    }
                }
                current = chunk;
            }
        }
        if !current.is_empty() {
            pieces.push(current);
        }
    }
    let mut pages: Vec<String> = Vec::new();
    let mut page = String::new();
    for piece in pieces {
        let candidate = if page.is_empty() { piece.clone() } else { format!("{page}\n{piece}") };
        if budget(&candidate, pages.is_empty()) {
            page = candidate;
        } else {
            pages.push(std::mem::replace(&mut page, piece));
        }
    }
    pages.push(page);
    let count = pages.len();
    pages
        .into_iter()
        .enumerate()
        .map(|(i, mut page)| {
            if i + 1 < count {
                page.push('\n');
                page.push_str(&texts.next);
            }
            if i > 0 {
                page.push('\n');
                page.push_str(&texts.back);
            }
            page
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every placeholder a screen may hold, at its longest.
    const WORST: &[(&str, &str)] = &[
        ("msisdn", "+994501234567"),
        ("to", "+994501234567"),
        ("service", "*150#"),
        ("balance", "99999999.99 AZN"),
        ("available", "99999999.99 AZN"),
        ("amount", "99999999.99 AZN"),
        ("fee", "99999.99 AZN"),
        ("code", "12345678"),
        ("minutes", "30"),
        ("remaining", "99999999.99 AZN"),
        ("time", "2026-11-23 23:59"),
        ("operation", "cash-out code"),
        ("reason", "The recipient cannot receive money."),
    ];

    #[test]
    fn every_language_has_every_key_of_english() {
        let english = texts(2);
        for language in LANGUAGES {
            let texts = texts(language);
            for (table, reference) in [
                (&texts.items, &english.items),
                (&texts.text, &english.text),
                (&texts.errors, &english.errors),
            ] {
                let mut missing: Vec<_> = reference.keys().filter(|k| !table.contains_key(*k)).collect();
                missing.sort();
                assert!(missing.is_empty(), "{}: missing {missing:?}", texts.name);
                assert_eq!(table.len(), reference.len(), "{}: extra keys", texts.name);
            }
        }
    }

    #[test]
    fn every_page_of_every_screen_fits_in_every_language() {
        for language in LANGUAGES {
            let texts = texts(language);
            let mut screens = vec![
                texts.menu("guest_title", &GUEST_ITEMS),
                texts.menu("main_title", &MAIN_ITEMS),
                texts.language_menu(),
            ];
            screens.extend(texts.text.keys().map(|key| texts.fill(key, WORST)));
            screens.extend(texts.errors.keys().map(|key| texts.error(key, WORST)));
            screens.push(format!(
                "{}\n{}",
                texts.fill("statement_title", &[]),
                ["23.11 12:00 -99999.99 +994501234567"; 5].join("\n")
            ));
            for screen in screens {
                let pages = pages(&screen, texts);
                for page in &pages {
                    let (used, limit) = text::measure(page);
                    assert!(used <= limit, "{}: {used} > {limit}: {page:?}", texts.name);
                }
                // Nothing lost: the pages hold every word of the screen.
                let joined = pages.join("\n");
                for word in screen.split_whitespace() {
                    assert!(joined.contains(word), "{}: lost {word:?} of {screen:?}", texts.name);
                }
            }
        }
    }

    #[test]
    fn a_long_screen_pages_with_next_and_back() {
        let texts = texts(0);
        let main = texts.menu("main_title", &MAIN_ITEMS);
        let pages = pages(&main, texts);
        assert!(pages.len() >= 2, "the Azerbaijani main menu needs UCS-2 and pages: {pages:?}");
        assert!(pages[0].ends_with("0 Növbəti"));
        assert!(pages[1].ends_with("00 Geri"));
        assert!(pages.concat().contains("7 Son əməliyyat"));
        let english = super::texts(2);
        assert_eq!(super::pages(&english.menu("main_title", &MAIN_ITEMS), english).len(), 1);
    }
}
