// The logins of the courses read model, made once, when the volume is initialised: the mongo
// image runs /docker-entrypoint-initdb.d/*.js with mongosh against MONGO_INITDB_DATABASE (the
// school database), authenticated as MONGO_INITDB_ROOT_USERNAME, the user it has just made
// (and with which it then starts mongod with --auth). Each login is defined in the school
// database (its authSource) and may act on that database only:
//   school_projector (projectors, stream-admin): readWrite, i.e. the course documents and
//     the checkpoint, their indexes, and a replay's collections (create, rename, drop);
//   school_query (query-api): read.
// Passwords come from the environment, PROJECTOR_PASSWORD and QUERY_PASSWORD (compose:
// docker-compose.yml; the chart: the MongoDB Secret); a missing one fails the first start.
// The chart ships this same script in a ConfigMap (charts/school/templates/mongodb.yaml):
// change both together.
const database = db.getName();
for (const [user, variable, role] of [
  ['school_projector', 'PROJECTOR_PASSWORD', 'readWrite'],
  ['school_query', 'QUERY_PASSWORD', 'read'],
]) {
  const pwd = process.env[variable];
  if (!pwd) {
    throw new Error(`${variable} is not set: cannot create the MongoDB user ${user}`);
  }
  db.createUser({ user, pwd, roles: [{ role, db: database }] });
  print(`created the MongoDB user ${user} (${role} on ${database})`);
}
