//! For `#[pg_test]`s: one row of a query's result as the raw datums a C function
//! would be handed, so hand-written datum readers can be checked against Postgres.

use pgrx::pg_sys;
use std::ffi::CString;

/// One column of the row.
pub struct Column {
    pub datum: pg_sys::Datum,
    pub is_null: bool,
    pub type_oid: pg_sys::Oid,
    pub by_value: bool,
    /// `typlen`: the byte length, -1 for varlena, -2 for C strings.
    pub len: i16,
}

/// Runs `query`, which must return exactly one row, and passes that row's columns
/// to `inspect` while they are valid (SPI frees them when it disconnects).
/// Pass-by-reference datums are as the executor produced them: a column read from
/// a table stays in its stored form (short header, compressed, toast pointer).
pub fn with_row<R>(query: &str, inspect: impl FnOnce(&[Column]) -> R) -> R {
    let text = CString::new(query).expect("a query without NUL bytes");
    // SAFETY: the calls follow SPI's protocol (connect, execute, read the result
    // table, finish) in a transaction, which #[pg_test]s run in; the result is read
    // only while SPI is connected; an error in any call raises a Postgres ERROR,
    // which aborts the test's transaction and cleans SPI up.
    unsafe {
        assert_eq!(pg_sys::SPI_connect(), pg_sys::SPI_OK_CONNECT as i32);
        let status = pg_sys::SPI_execute(text.as_ptr(), false, 0);
        assert_eq!(status, pg_sys::SPI_OK_SELECT as i32, "{query}");
        let (processed, table) = (pg_sys::SPI_processed, pg_sys::SPI_tuptable);
        assert_eq!(processed, 1, "{query} returns one row");
        let tupdesc = (*table).tupdesc;
        let tuple = *(*table).vals;
        let columns: Vec<Column> = (0..(*tupdesc).natts as usize)
            .map(|i| {
                let mut is_null = false;
                let datum = pg_sys::SPI_getbinval(tuple, tupdesc, i as i32 + 1, &mut is_null);
                let att = crate::row_json::attr(tupdesc, i);
                Column {
                    datum,
                    is_null,
                    type_oid: att.atttypid,
                    by_value: att.attbyval,
                    len: att.attlen,
                }
            })
            .collect();
        let result = inspect(&columns);
        pg_sys::SPI_finish();
        result
    }
}

/// A text column's value.
pub fn text(column: &Column) -> Option<String> {
    assert_eq!(column.type_oid, pg_sys::TEXTOID);
    // SAFETY: `column` came from `with_row`, still connected, and is a text value.
    unsafe { pgrx::FromDatum::from_datum(column.datum, column.is_null) }
}
