//! Parameters a server reports (ParameterStatus) and the startup
//! `options` string. What follows a client across servers is in `session`.

/// Server-reported values: (name, value).
pub(crate) type Params = Vec<(String, String)>;

/// The value of `name` (parameter names are case-insensitive).
pub(crate) fn get<'a>(list: &'a [(String, String)], name: &str) -> Option<&'a str> {
    list.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Sets `name` to `value`, keeping the first spelling of the name.
pub(crate) fn set(list: &mut Params, name: &str, value: &str) {
    match list.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
        Some(p) => value.clone_into(&mut p.1),
        None => list.push((name.to_string(), value.to_string())),
    }
}

/// Parses the startup `options` parameter: `-c name=value` and
/// `--name=value`, with `\` escaping a space, as libpq builds it.
pub(crate) fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut escaped = false;
    for ch in options.chars() {
        if escaped {
            word.push(ch);
            escaped = false;
        } else if ch == '\\' {
            escaped = true;
        } else if ch.is_whitespace() {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
        } else {
            word.push(ch);
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next()
        } else if let Some(rest) = w.strip_prefix("-c") {
            Some(rest.to_string())
        } else {
            w.strip_prefix("--").map(str::to_string)
        };
        if let Some((name, value)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            let name = name.replace('-', "_");
            if crate::session::valid_name(&name) {
                out.push((name, value.to_string()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_options_are_parsed_like_libpq_builds_them() {
        assert_eq!(
            parse_options(
                "-c search_path=s1,public --statement-timeout=5s -cTimeZone=Asia/Tokyo -c a=b\\ c"
            ),
            vec![
                ("search_path".into(), "s1,public".into()),
                ("statement_timeout".into(), "5s".into()),
                ("TimeZone".into(), "Asia/Tokyo".into()),
                ("a".into(), "b c".into()),
            ]
        );
        assert!(parse_options("-x -c").is_empty());
    }
}
