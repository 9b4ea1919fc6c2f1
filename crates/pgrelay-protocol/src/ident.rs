//! SQL identifier quoting, the one place it is done: PostgreSQL and SQLite
//! both quote an identifier in double quotes, a double quote inside it
//! doubled, so the server's statements, the slot's publication and the
//! client's replica tables all share these two functions.

/// `name` as a quoted identifier: `my"t` → `"my""t"`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A table name as `"schema"."table"`, split at the first dot; a name
/// without a dot is in `public`.
pub fn quote_table(name: &str) -> String {
    let (schema, table) = name.split_once('.').unwrap_or(("public", name));
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quotes_are_doubled_and_names_qualified() {
        assert_eq!(quote_ident("plain"), r#""plain""#);
        assert_eq!(quote_ident(r#"my"t"#), r#""my""t""#);
        assert_eq!(quote_ident(""), r#""""#);
        assert_eq!(quote_table(r#"app.my"t"#), r#""app"."my""t""#);
        assert_eq!(quote_table("todos"), r#""public"."todos""#);
        // Only the first dot separates schema from table.
        assert_eq!(quote_table("a.b.c"), r#""a"."b.c""#);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Undoing the quoting gives the name back: no name can end the
        /// identifier early and inject SQL.
        #[test]
        fn quoting_round_trips(name in ".*") {
            let quoted = quote_ident(&name);
            let inner = &quoted[1..quoted.len() - 1];
            prop_assert!(quoted.starts_with('"') && quoted.ends_with('"'));
            prop_assert!(!inner.replace("\"\"", "").contains('"'));
            prop_assert_eq!(inner.replace("\"\"", "\""), name);
        }
    }
}
