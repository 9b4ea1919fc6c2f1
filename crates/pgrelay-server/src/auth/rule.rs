//! The rule language of `rules.toml`: a small boolean expression over a
//! row's columns and the token's claims, parsed by hand so nothing but
//! comparisons, `IN`, `IS [NOT] NULL`, `AND`, `OR`, `NOT` and parentheses
//! exists. A rule is first bound to one token's claims (claims become
//! values); the bound rule then runs in memory over rows, or becomes a SQL
//! predicate whose every value is a parameter.

use std::collections::BTreeSet;

use pgrelay_protocol::Row;

/// One side of a comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Operand {
    Column(String),
    /// `claims.a.b`: a path into the token's claims.
    Claim(Vec<String>),
    Literal(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Expr {
    Const(bool),
    Compare {
        left: Operand,
        right: Operand,
        equal: bool,
    },
    /// `x IN (a, b)`, or `x IN claims.list` (one operand, a claim array).
    In {
        left: Operand,
        list: Vec<Operand>,
    },
    IsNull {
        operand: Operand,
        null: bool,
    },
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

/// A rule bound to one token's claims: only columns and values are left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Bound {
    Const(bool),
    /// `column = value` (or `<>`); false when the column is NULL.
    Value {
        column: String,
        value: String,
        equal: bool,
    },
    Columns {
        left: String,
        right: String,
        equal: bool,
    },
    OneOf {
        column: String,
        values: Vec<String>,
    },
    IsNull {
        column: String,
        null: bool,
    },
    Not(Box<Bound>),
    And(Vec<Bound>),
    Or(Vec<Bound>),
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ParseError(pub(crate) String);

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Ident(String),
    Str(String),
    Number(String),
    Dot,
    Comma,
    Open,
    Close,
    Eq,
    NotEq,
}

fn lex(text: &str) -> Result<Vec<Token>, ParseError> {
    let mut tokens = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some(&(at, c)) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '.' => {
                chars.next();
                tokens.push(Token::Dot);
            }
            ',' => {
                chars.next();
                tokens.push(Token::Comma);
            }
            '(' => {
                chars.next();
                tokens.push(Token::Open);
            }
            ')' => {
                chars.next();
                tokens.push(Token::Close);
            }
            '=' => {
                chars.next();
                tokens.push(Token::Eq);
            }
            '!' | '<' => {
                chars.next();
                let want = if c == '!' { '=' } else { '>' };
                match chars.next() {
                    Some((_, n)) if n == want => tokens.push(Token::NotEq),
                    _ => return Err(ParseError(format!("at {at}: expected `!=` or `<>`"))),
                }
            }
            '\'' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\'')) => {
                            // '' inside a string is a quote, as in SQL.
                            if matches!(chars.peek(), Some((_, '\''))) {
                                chars.next();
                                s.push('\'');
                            } else {
                                break;
                            }
                        }
                        Some((_, ch)) => s.push(ch),
                        None => return Err(ParseError(format!("at {at}: unterminated string"))),
                    }
                }
                tokens.push(Token::Str(s));
            }
            c if c.is_ascii_digit() || c == '-' => {
                let mut s = String::new();
                s.push(c);
                chars.next();
                while let Some(&(_, d)) = chars.peek() {
                    if d.is_ascii_digit() || d == '.' {
                        s.push(d);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if s == "-" || s.parse::<f64>().is_err() {
                    return Err(ParseError(format!("at {at}: bad number {s:?}")));
                }
                tokens.push(Token::Number(s));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut s = String::new();
                while let Some(&(_, d)) = chars.peek() {
                    if d.is_ascii_alphanumeric() || d == '_' {
                        s.push(d);
                        chars.next();
                    } else {
                        break;
                    }
                }
                tokens.push(Token::Ident(s));
            }
            other => return Err(ParseError(format!("at {at}: unexpected {other:?}"))),
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

/// Parses a rule. Keywords are case-insensitive; a column named like a
/// keyword cannot be used.
pub(crate) fn parse(text: &str) -> Result<Expr, ParseError> {
    let mut parser = Parser {
        tokens: lex(text)?,
        at: 0,
    };
    if parser.tokens.is_empty() {
        return Err(ParseError("empty rule".to_owned()));
    }
    let expr = parser.or()?;
    match parser.tokens.get(parser.at) {
        None => Ok(expr),
        Some(t) => Err(ParseError(format!("unexpected {t:?} after the rule"))),
    }
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn keyword(&mut self, word: &str) -> bool {
        match self.peek() {
            Some(Token::Ident(s)) if s.eq_ignore_ascii_case(word) => {
                self.at += 1;
                true
            }
            _ => false,
        }
    }

    fn expect(&mut self, token: Token) -> Result<(), ParseError> {
        match self.peek() {
            Some(t) if *t == token => {
                self.at += 1;
                Ok(())
            }
            other => Err(ParseError(format!("expected {token:?}, found {other:?}"))),
        }
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        let mut items = vec![self.and()?];
        while self.keyword("or") {
            items.push(self.and()?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Expr::Or(items)
        })
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut items = vec![self.unary()?];
        while self.keyword("and") {
            items.push(self.unary()?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Expr::And(items)
        })
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        if self.keyword("not") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.peek() == Some(&Token::Open) {
            self.at += 1;
            let inner = self.or()?;
            self.expect(Token::Close)?;
            return Ok(inner);
        }
        if self.keyword("true") {
            return Ok(Expr::Const(true));
        }
        if self.keyword("false") {
            return Ok(Expr::Const(false));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, ParseError> {
        let left = self.operand()?;
        if self.keyword("is") {
            let negated = self.keyword("not");
            if !self.keyword("null") {
                return Err(ParseError("expected NULL after IS".to_owned()));
            }
            return Ok(Expr::IsNull {
                operand: left,
                null: !negated,
            });
        }
        if self.keyword("in") {
            if self.peek() != Some(&Token::Open) {
                let claim = self.operand()?;
                if !matches!(claim, Operand::Claim(_)) {
                    return Err(ParseError(
                        "IN takes a list in parentheses or a claim".to_owned(),
                    ));
                }
                return Ok(Expr::In {
                    left,
                    list: vec![claim],
                });
            }
            self.at += 1;
            let mut list = vec![self.operand()?];
            while self.peek() == Some(&Token::Comma) {
                self.at += 1;
                list.push(self.operand()?);
            }
            self.expect(Token::Close)?;
            return Ok(Expr::In { left, list });
        }
        let equal = match self.peek() {
            Some(Token::Eq) => true,
            Some(Token::NotEq) => false,
            other => {
                return Err(ParseError(format!(
                    "expected =, !=, IN or IS after an operand, found {other:?}"
                )))
            }
        };
        self.at += 1;
        let right = self.operand()?;
        Ok(Expr::Compare { left, right, equal })
    }

    fn operand(&mut self) -> Result<Operand, ParseError> {
        match self.peek().cloned() {
            Some(Token::Str(s)) | Some(Token::Number(s)) => {
                self.at += 1;
                Ok(Operand::Literal(s))
            }
            Some(Token::Ident(name)) => {
                let reserved = ["and", "or", "not", "in", "is", "null", "true", "false"];
                if reserved.iter().any(|k| name.eq_ignore_ascii_case(k)) {
                    return Err(ParseError(format!("expected an operand, found {name}")));
                }
                self.at += 1;
                if name == "claims" {
                    let mut path = Vec::new();
                    while self.peek() == Some(&Token::Dot) {
                        self.at += 1;
                        match self.peek().cloned() {
                            Some(Token::Ident(part)) => {
                                self.at += 1;
                                path.push(part);
                            }
                            other => {
                                return Err(ParseError(format!(
                                    "expected a claim name after `.`, found {other:?}"
                                )))
                            }
                        }
                    }
                    if path.is_empty() {
                        return Err(ParseError("`claims` needs a name: claims.sub".to_owned()));
                    }
                    Ok(Operand::Claim(path))
                } else {
                    Ok(Operand::Column(name))
                }
            }
            other => Err(ParseError(format!("expected an operand, found {other:?}"))),
        }
    }
}

impl Expr {
    /// Every column the rule reads.
    pub(crate) fn columns(&self, out: &mut BTreeSet<String>) {
        let mut add = |o: &Operand| {
            if let Operand::Column(c) = o {
                out.insert(c.clone());
            }
        };
        match self {
            Expr::Const(_) => {}
            Expr::Compare { left, right, .. } => {
                add(left);
                add(right);
            }
            Expr::In { left, list } => {
                add(left);
                list.iter().for_each(add);
            }
            Expr::IsNull { operand, .. } => add(operand),
            Expr::Not(e) => e.columns(out),
            Expr::And(items) | Expr::Or(items) => items.iter().for_each(|e| e.columns(out)),
        }
    }

    /// Every claim path the rule reads.
    pub(crate) fn claims(&self, out: &mut BTreeSet<Vec<String>>) {
        let mut add = |o: &Operand| {
            if let Operand::Claim(c) = o {
                out.insert(c.clone());
            }
        };
        match self {
            Expr::Const(_) => {}
            Expr::Compare { left, right, .. } => {
                add(left);
                add(right);
            }
            Expr::In { left, list } => {
                add(left);
                list.iter().for_each(add);
            }
            Expr::IsNull { operand, .. } => add(operand),
            Expr::Not(e) => e.claims(out),
            Expr::And(items) | Expr::Or(items) => items.iter().for_each(|e| e.claims(out)),
        }
    }

    /// Replaces claims by their values in `claims`. A missing claim, JSON
    /// null, or an object is no value: comparisons with it are false.
    pub(crate) fn bind(&self, claims: &serde_json::Map<String, serde_json::Value>) -> Bound {
        match self {
            Expr::Const(b) => Bound::Const(*b),
            Expr::Compare { left, right, equal } => {
                match (resolve(left, claims), resolve(right, claims)) {
                    (Side::Column(l), Side::Column(r)) => Bound::Columns {
                        left: l,
                        right: r,
                        equal: *equal,
                    },
                    (Side::Column(column), Side::Values(v))
                    | (Side::Values(v), Side::Column(column)) => match scalar(v) {
                        Some(value) => Bound::Value {
                            column,
                            value,
                            equal: *equal,
                        },
                        None => Bound::Const(false),
                    },
                    (Side::Values(l), Side::Values(r)) => match (scalar(l), scalar(r)) {
                        (Some(l), Some(r)) => Bound::Const((l == r) == *equal),
                        _ => Bound::Const(false),
                    },
                }
            }
            Expr::In { left, list } => {
                let mut values = Vec::new();
                for item in list {
                    match resolve(item, claims) {
                        Side::Values(v) => values.extend(v),
                        // A column in the list: `a IN (b, 'x')` is `a = b OR a = 'x'`.
                        Side::Column(c) => {
                            let rest: Vec<Operand> =
                                list.iter().filter(|o| *o != item).cloned().collect();
                            let first = Expr::Compare {
                                left: left.clone(),
                                right: Operand::Column(c),
                                equal: true,
                            };
                            let others = Expr::In {
                                left: left.clone(),
                                list: rest,
                            };
                            return Bound::Or(vec![first.bind(claims), others.bind(claims)]);
                        }
                    }
                }
                match resolve(left, claims) {
                    Side::Column(column) if values.is_empty() => {
                        let _ = column;
                        Bound::Const(false)
                    }
                    Side::Column(column) => Bound::OneOf { column, values },
                    Side::Values(v) => match scalar(v) {
                        Some(value) => Bound::Const(values.contains(&value)),
                        None => Bound::Const(false),
                    },
                }
            }
            Expr::IsNull { operand, null } => match resolve(operand, claims) {
                Side::Column(column) => Bound::IsNull {
                    column,
                    null: *null,
                },
                Side::Values(v) => Bound::Const(v.is_empty() == *null),
            },
            Expr::Not(e) => match e.bind(claims) {
                Bound::Const(b) => Bound::Const(!b),
                other => Bound::Not(Box::new(other)),
            },
            Expr::And(items) => {
                let mut bound = Vec::new();
                for item in items {
                    match item.bind(claims) {
                        Bound::Const(false) => return Bound::Const(false),
                        Bound::Const(true) => {}
                        other => bound.push(other),
                    }
                }
                match bound.len() {
                    0 => Bound::Const(true),
                    1 => bound.remove(0),
                    _ => Bound::And(bound),
                }
            }
            Expr::Or(items) => {
                let mut bound = Vec::new();
                for item in items {
                    match item.bind(claims) {
                        Bound::Const(true) => return Bound::Const(true),
                        Bound::Const(false) => {}
                        other => bound.push(other),
                    }
                }
                match bound.len() {
                    0 => Bound::Const(false),
                    1 => bound.remove(0),
                    _ => Bound::Or(bound),
                }
            }
        }
    }
}

enum Side {
    Column(String),
    /// The operand's values: one for a scalar, several for a claim array,
    /// none for a missing claim.
    Values(Vec<String>),
}

fn scalar(mut values: Vec<String>) -> Option<String> {
    (values.len() == 1).then(|| values.remove(0))
}

fn resolve(operand: &Operand, claims: &serde_json::Map<String, serde_json::Value>) -> Side {
    match operand {
        Operand::Column(c) => Side::Column(c.clone()),
        Operand::Literal(v) => Side::Values(vec![v.clone()]),
        Operand::Claim(path) => {
            let mut value = claims.get(&path[0]);
            for part in &path[1..] {
                value = value.and_then(|v| v.get(part));
            }
            Side::Values(match value {
                Some(serde_json::Value::Array(items)) => {
                    items.iter().filter_map(claim_text).collect()
                }
                Some(v) => claim_text(v).into_iter().collect(),
                None => Vec::new(),
            })
        }
    }
}

/// A claim's value as text: strings as they are, numbers and booleans as
/// JSON writes them.
pub(crate) fn claim_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Bound {
    /// Whether `row` passes. Values compare as PostgreSQL's text output; a
    /// column the row lacks counts as NULL.
    pub(crate) fn eval(&self, row: &Row) -> bool {
        let get = |c: &str| row.get(c).and_then(|v| v.as_deref());
        match self {
            Bound::Const(b) => *b,
            Bound::Value {
                column,
                value,
                equal,
            } => get(column).is_some_and(|v| (v == value) == *equal),
            Bound::Columns { left, right, equal } => match (get(left), get(right)) {
                (Some(l), Some(r)) => (l == r) == *equal,
                _ => false,
            },
            Bound::OneOf { column, values } => {
                get(column).is_some_and(|v| values.iter().any(|x| x == v))
            }
            Bound::IsNull { column, null } => get(column).is_none() == *null,
            Bound::Not(e) => !e.eval(row),
            Bound::And(items) => items.iter().all(|e| e.eval(row)),
            Bound::Or(items) => items.iter().any(|e| e.eval(row)),
        }
    }

    /// The rule as a SQL predicate that is never NULL. Values are appended
    /// to `params` and referenced as `$n`; columns are quoted identifiers
    /// (checked against the table's schema when the rules were loaded).
    pub(crate) fn to_sql(&self, params: &mut Vec<Option<String>>) -> String {
        let bind = |v: &str, params: &mut Vec<Option<String>>| {
            params.push(Some(v.to_owned()));
            format!("${}::text", params.len())
        };
        match self {
            Bound::Const(true) => "true".to_owned(),
            Bound::Const(false) => "false".to_owned(),
            Bound::Value {
                column,
                value,
                equal,
            } => {
                let op = if *equal { "=" } else { "<>" };
                format!(
                    "coalesce({}::text {op} {}, false)",
                    quote(column),
                    bind(value, params)
                )
            }
            Bound::Columns { left, right, equal } => {
                let op = if *equal { "=" } else { "<>" };
                format!(
                    "coalesce({}::text {op} {}::text, false)",
                    quote(left),
                    quote(right)
                )
            }
            Bound::OneOf { column, values } => {
                let list = values
                    .iter()
                    .map(|v| bind(v, params))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("coalesce({}::text IN ({list}), false)", quote(column))
            }
            Bound::IsNull { column, null } => {
                let not = if *null { "" } else { " NOT" };
                format!("({} IS{not} NULL)", quote(column))
            }
            Bound::Not(e) => format!("(NOT {})", e.to_sql(params)),
            Bound::And(items) => {
                let parts: Vec<String> = items.iter().map(|e| e.to_sql(params)).collect();
                format!("({})", parts.join(" AND "))
            }
            Bound::Or(items) => {
                let parts: Vec<String> = items.iter().map(|e| e.to_sql(params)).collect();
                format!("({})", parts.join(" OR "))
            }
        }
    }

    pub(crate) fn is_false(&self) -> bool {
        *self == Bound::Const(false)
    }
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().cloned().unwrap()
    }

    fn row(pairs: &[(&str, Option<&str>)]) -> Row {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
            .collect()
    }

    #[test]
    fn parses_the_documented_forms() {
        for text in [
            "tenant_id = claims.tenant_id",
            "owner = claims.sub OR claims.role = 'admin'",
            "NOT (status = 'hidden') AND team IN ('a', 'b', claims.team)",
            "group_id IN claims.groups",
            "deleted_at IS NULL and owner <> 'x'",
            "n != -1.5",
            "true",
        ] {
            parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
        for bad in [
            "",
            "tenant_id",
            "a = ",
            "a = 'x",
            "a = b; DROP TABLE t",
            "claims = 1",
            "a IN b",
            "(a = 1",
            "a = 1 b = 2",
            "a == 1",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn binds_and_evaluates() {
        let rule = parse("owner = claims.sub OR claims.role = 'admin'").unwrap();
        let admin = rule.bind(&claims(json!({"sub": "u1", "role": "admin"})));
        assert_eq!(admin, Bound::Const(true));
        let user = rule.bind(&claims(json!({"sub": "u1"})));
        assert!(user.eval(&row(&[("owner", Some("u1"))])));
        assert!(!user.eval(&row(&[("owner", Some("u2"))])));
        assert!(!user.eval(&row(&[("owner", None)])));
        let not = parse("NOT owner = claims.sub")
            .unwrap()
            .bind(&claims(json!({"sub": "u1"})));
        // NULL owner: neither equal nor, in SQL's sense, unequal; NOT of a
        // false comparison is true in memory and in SQL (coalesce).
        assert!(not.eval(&row(&[("owner", None)])));
        let missing = parse("tenant_id = claims.tenant_id")
            .unwrap()
            .bind(&claims(json!({})));
        assert_eq!(missing, Bound::Const(false));
        let groups = parse("g IN claims.groups")
            .unwrap()
            .bind(&claims(json!({"groups": ["a", 7]})));
        assert!(groups.eval(&row(&[("g", Some("7"))])));
        assert!(!groups.eval(&row(&[("g", Some("b"))])));
    }

    #[test]
    fn sql_binds_every_value() {
        let rule = parse("tenant_id = claims.t AND (kind IN ('a', 'b') OR note IS NULL)").unwrap();
        let bound = rule.bind(&claims(json!({"t": "x'); DROP TABLE t; --"})));
        let mut params = Vec::new();
        let sql = bound.to_sql(&mut params);
        assert_eq!(
            sql,
            r#"(coalesce("tenant_id"::text = $1::text, false) AND (coalesce("kind"::text IN ($2::text, $3::text), false) OR ("note" IS NULL)))"#
        );
        assert_eq!(params[0].as_deref(), Some("x'); DROP TABLE t; --"));
        assert!(!sql.contains('\''));
    }
}
