// The session's query API takes PostgresNIO's `PostgresQuery` ("… \(value)" literals) and returns
// its `PostgresRow`s: importing ContextDBPostgres alone is enough to write and read queries, also
// with the `MemberImportVisibility` upcoming feature, as PostgresKit does.
@_exported import PostgresNIO
