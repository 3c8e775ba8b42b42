// handlens' offline page: every file of the export is cached on install and answered cache-first, so the page
// and its model work with no network after the first load. The list and version are written by the export.
'use strict';
const FILES = __HANDLENS_FILES__;
const PREFIX = 'handlens-web:' + self.registration.scope + ':';
const CACHE = PREFIX + '__HANDLENS_VERSION__';

self.addEventListener('install', (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(FILES.map((f) => new Request(f, {cache: 'reload'}))))
    .then(() => self.skipWaiting()));
});

self.addEventListener('activate', (event) => {
  event.waitUntil(caches.keys()
    .then((keys) => Promise.all(keys.filter((k) => k.startsWith(PREFIX) && k !== CACHE).map((k) => caches.delete(k))))
    .then(() => self.clients.claim()));
});

self.addEventListener('fetch', (event) => {
  if (event.request.method !== 'GET') return;
  event.respondWith(caches.open(CACHE).then((cache) => cache.match(event.request, {ignoreSearch: true})
    .then((hit) => hit || fetch(event.request))));
});
