//! The screen side of USSD sessions on arbitrary text: paging in every language must give pages
//! that each fit one USSD string and lose no word; encoding picks GSM 7-bit or UCS-2 and decodes
//! back to the same text (or, for characters outside UCS-2, to `?`).
#![no_main]

use channels::ussd::{menu, text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(screen) = std::str::from_utf8(data) else {
        let _ = text::decode(data.first().copied().unwrap_or(0), data);
        return;
    };
    if screen.len() > 2000 {
        return;
    }
    for language in menu::LANGUAGES {
        let texts = menu::texts(language);
        let pages = menu::pages(screen, texts);
        for page in &pages {
            assert!(text::fits(page), "{page:?}");
        }
        // Nothing lost, nothing added: the pages without their paging lines hold the screen's
        // characters, whitespace aside.
        let last = pages.len() - 1;
        let mut content = String::new();
        for (i, page) in pages.iter().enumerate() {
            let mut page = page.as_str();
            if i > 0 {
                page = page.strip_suffix(&format!("\n{}", texts.back)).expect("back line");
            }
            if i < last {
                page = page.strip_suffix(&format!("\n{}", texts.next)).expect("next line");
            }
            content.push_str(page);
        }
        let squeeze = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
        assert_eq!(squeeze(&content), squeeze(screen));
    }
    // Decoding what was encoded and encoding it again gives the same octets.
    if screen.chars().any(|c| u32::from(c) >= 0x1_0000) {
        return; // UCS-2 carries these as `?`: not the same text back, by design.
    }
    let encoded = text::encode(screen);
    let decoded = text::decode(encoded.data_coding, &encoded.bytes).expect("decodes what it encoded");
    assert_eq!(text::encode(&decoded), encoded);
});
