//! The parser of the rule language: a hand-written lexer and recursive
//! descent over `OR` / `AND` / `NOT` / comparison, nothing else.

use super::expr::{Expr, Operand};

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
